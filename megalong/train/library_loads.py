"""The one place where megalong lets libraries read the pickled files they write, and how it makes
that safe. megalong's own files hold no pickle (megalong/checkpoint/files.py); two formats
of other libraries do:

* megatron-core's distributed checkpoint (`train.checkpoint_format: megatron`, the `dist/`
  directory): `common.pt` is read by megatron-core 0.16.1 with a plain `torch.load` (weights_only
  by torch's default, unless the environment sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), and the
  `.metadata` file by torch.distributed.checkpoint's FileSystemReader with `pickle.load`, which
  would run any code a stranger's file carries;
* DeepSpeed 0.19.8's own files (`train.engine: deepspeed`, the `deepspeed/` directory), read by its
  TorchCheckpointEngine with `torch.load(weights_only=False)`.

Inside `pickles_without_code()` every `torch.load` is weights_only (torch's own switch,
TORCH_FORCE_WEIGHTS_ONLY_LOAD, which overrides a caller's weights_only=False), with only the few
DeepSpeed classes its files hold added to torch's allow-list; and torch.distributed.checkpoint's
metadata is read by `RestrictedUnpickler`, which builds only the metadata classes listed below.
Anything else in such a file is refused with a CheckpointError naming it. The patch is in place
only while the context is open.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from megalong.errors import CheckpointError

# torch.distributed.checkpoint's metadata (written by megatron-core through torch 2.13's
# FileSystemWriter): dataclasses, enums and torch's value types; nothing that runs code.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided and friends by name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a class or function outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only the classes of torch.distributed.checkpoint's metadata (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise RefusedGlobal(f"refused to load {module}.{name}: not a torch.distributed."
                                     "checkpoint metadata class")


def read_dcp_metadata(path: Path) -> Any:
    """torch.distributed.checkpoint's Metadata from `path`, through RestrictedUnpickler."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except RefusedGlobal as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbage: EOFError, ValueError, ... from pickle
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint metadata file "
                              f"({type(e).__name__}: {e})") from None


class _RestrictedPickleModule:
    """Stands in for the `pickle` module inside torch's filesystem reader: `load` restricted."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file: io.IOBase, **_: Any) -> Any:
        return RestrictedUnpickler(file).load()


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19.8's ZeRO optimizer files hold besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def pickles_without_code(extra_safe_globals: list = ()) -> Iterator[None]:
    """Within: every torch.load is weights_only=True (allowing `extra_safe_globals` too), and
    torch.distributed.checkpoint reads its metadata with RestrictedUnpickler."""
    from torch.distributed.checkpoint import filesystem

    saved_env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                  "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    saved_pickle = filesystem.pickle
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    filesystem.pickle = _RestrictedPickleModule()
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            yield
    finally:
        filesystem.pickle = saved_pickle
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_load_error(e: BaseException) -> str:
    """One line for an exception of torch.load (or of a library's load around it). torch's own
    message for a refused pickle advises weights_only=False: that advice is not passed on."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            return (f"holds a pickle that loading with weights_only=True refuses (it would call "
                    f"{refused.group(1)})")
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        reason = " ".join((detail.group(1) if detail else text).split())[:200]
        return f"cannot be read: not a torch file, or corrupt ({reason})"
    return f"cannot be read ({type(e).__name__}: {' '.join(text.split())[:300]})"
