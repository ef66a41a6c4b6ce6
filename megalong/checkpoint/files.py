"""The files of a step directory and how they are read and written: tensors in safetensors files,
everything else in JSON (meta.json, RNG states) or YAML (config.yaml). Nothing here unpickles.

Every reader checks what it reads, so that a missing, truncated or garbled file, or a meta.json or
config.yaml with missing keys or wrong types, is a CheckpointError naming the file and what is
wrong (`megalong: checkpoint error: <file>: <what>` on the command line), never a traceback from
safetensors, json or yaml.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from megalong.config import Config, ConfigError, config_from_dict, migrate_saved_config
from megalong.errors import CheckpointError, TokenizerError
from megalong.checkpoint.layout import META

FORMAT_VERSION = 2  # 1 (unnumbered): pickled torch .pt files; 2: safetensors and JSON
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"


def convert_hint(step_dir: Path) -> str:
    return (f"{step_dir}: written in the old .pt format (pickled torch files, which can run code when "
            f"loaded; megalong no longer reads them); convert it once with `megalong checkpoint "
            f"convert {step_dir}` if you trust its source")


# --- tensors -------------------------------------------------------------------------------------

def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of CPU copies (entries that are not tensors, like megatron's empty
    `_extra_state`, are left out: the loading model keeps its own)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    save_file(plain, str(path), metadata=metadata)


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _require(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception), or OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_tensor_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    _require(path)
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _require(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")


# --- JSON and YAML -------------------------------------------------------------------------------

def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    _require(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _dims(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and (d is None or _int(0)(d)) for k, d in v.items())


# meta.json: key -> (check, what it must be)
META_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (_int(1), "a format number"),
    "step": (_int(0), "an integer >= 0"),
    "tensor_parallel": (_int(1), "a positive integer"),
    "pipeline_parallel": (_int(1), "a positive integer"),
    "data_parallel": (_int(1), "a positive integer"),
    "expert_parallel": (_int(1), "a positive integer"),
    "world_size": (_int(1), "a positive integer"),
    "tokenizer_vocab_size": (_int(1), "a positive integer"),
    "gated_mlp": (lambda v: isinstance(v, bool), "true or false"),
    "partition_dims": (_dims, "a mapping of parameter names to a dimension or null"),
}
FORMATS = ("megalong", "megatron")


def read_meta(step_dir: Path) -> dict:
    """meta.json, checked: every key present with its type; an old-format checkpoint refused."""
    path = step_dir / META
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if "format_version" not in meta and any(step_dir.glob("*.pt")):
        raise CheckpointError(convert_hint(step_dir))
    for key, (check, expected) in META_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"{path}: missing key '{key}'")
        if not check(meta[key]):
            raise CheckpointError(f"{path}: '{key}' must be {expected}, got {meta[key]!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is newer than this "
                              f"megalong reads ({FORMAT_VERSION}); upgrade megalong")
    if meta.get("format", "megalong") not in FORMATS:
        raise CheckpointError(f"{path}: 'format' must be one of {FORMATS}, got {meta['format']!r}")
    if meta.get("engine", "megatron") not in ("megatron", "deepspeed"):
        raise CheckpointError(f"{path}: 'engine' must be 'megatron' or 'deepspeed', got {meta['engine']!r}")
    if "wandb_run_id" in meta and not (isinstance(meta["wandb_run_id"], str) and meta["wandb_run_id"]):
        raise CheckpointError(f"{path}: 'wandb_run_id' must be a non-empty string, got {meta['wandb_run_id']!r}")
    if meta.get("engine") == "deepspeed" and not _int(1)(meta.get("zero_stage")):
        raise CheckpointError(f"{path}: 'zero_stage' must be 1, 2 or 3, got {meta.get('zero_stage')!r}")
    return meta


def read_config(step_dir: Path) -> Config:
    path = step_dir / CONFIG
    _require(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    try:
        return config_from_dict(migrate_saved_config(raw))  # written before keys moved: migrated
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value config_from_dict did not expect
        raise CheckpointError(f"{path}: not a megalong config ({e})") from None


def json_safe_groups(param_groups: list[dict]) -> list[dict]:
    """The optimizer's param-group hyper-parameters (not the parameters) as JSON values."""
    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)

    return [{k: plain(v) for k, v in group.items() if k != "params"} for group in param_groups]


# --- RNG states ----------------------------------------------------------------------------------

def save_rng(path: Path) -> None:
    """This process's RNG states (torch's, CUDA's where present, Python's, numpy's)."""
    write_rng(path, torch.get_rng_state(), random.getstate(), np.random.get_state(),
              torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def write_rng(path: Path, torch_state: torch.Tensor, python_state: tuple, numpy_state: tuple,
              cuda_state: torch.Tensor | None = None) -> None:
    """torch's (and CUDA's) generator states as uint8 tensors; Python's and numpy's (the tuples
    random.getstate() and np.random.get_state() return) as JSON in the file's metadata."""
    tensors = {"torch": torch_state}
    if cuda_state is not None:
        tensors["cuda"] = cuda_state
    version, internal, gauss_next = python_state
    name, keys, pos, has_gauss, cached_gaussian = numpy_state
    metadata = {
        "python": json.dumps({"version": version, "internal": [int(x) for x in internal],
                              "gauss_next": gauss_next}),
        "numpy": json.dumps({"bit_generator": str(name), "keys": np.asarray(keys).tolist(), "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}),
    }
    write_tensors(path, tensors, metadata)


def load_rng(path: Path) -> None:
    """Restore the states save_rng wrote (CUDA's only where both runs have CUDA)."""
    tensors = read_tensors(path)
    metadata = read_tensor_metadata(path)
    try:
        python = json.loads(metadata["python"])
        numpy_state = json.loads(metadata["numpy"])
        torch_state = tensors["torch"]
        python_state = (int(python["version"]), tuple(int(x) for x in python["internal"]),
                        None if python["gauss_next"] is None else float(python["gauss_next"]))
        numpy_tuple = (str(numpy_state["bit_generator"]), np.array(numpy_state["keys"], dtype=np.uint32),
                       int(numpy_state["pos"]), int(numpy_state["has_gauss"]),
                       float(numpy_state["cached_gaussian"]))
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_tuple)
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid set of RNG states ({type(e).__name__}: {e})") from None


# --- tokenizer -----------------------------------------------------------------------------------

def checkpoint_tokenizer(step_dir: Path):
    """The SentencePiece tokenizer saved beside the weights."""
    from megalong.data.tokenizer import SentencePieceTokenizer

    path = step_dir / TOKENIZER
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: the checkpoint has no tokenizer, so its token ids "
                              "cannot be turned into text (copy the run's data.tokenizer there)")
    try:
        return SentencePieceTokenizer(path)
    except TokenizerError as e:  # it names the file and what is wrong with it
        raise CheckpointError(str(e)) from None
