"""`megalong checkpoint convert SRC [DST]`: checkpoints of the old pickled .pt format rewritten, once,
in today's (safetensors and JSON), by a user who trusts their source. Nothing else reads .pt files.

SRC is a step directory or a save_dir (each of its old-format step directories is converted).
Without DST the conversion is in place: the new files are written beside the old ones, meta.json
(with its format_version) is replaced last, and only then are the .pt files deleted, so a
conversion killed midway leaves a checkpoint that is either still old (convert it again) or new.
With DST a converted copy is written there (DST must not exist) and SRC is left as it was.

Even here nothing runs code: every old file is read with torch.load(weights_only=True), which
builds only tensors and plain containers, plus numpy's array classes for the old RNG files (numpy's
RNG state is an array), so a file carrying anything else is refused. DeepSpeed's and megatron's own
files (`deepspeed/`, `dist/`) are kept as they are: megalong reads them through
megalong/train/library_loads.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megalong.train.checkpoint_files import (
    FORMAT_VERSION, META, CheckpointError, json_safe_groups, read_json, write_rng, write_tensors,
    write_text_atomically)
from megalong.train.library_loads import describe_load_error
from megalong.train.save_dir import STEP_DIR

OLD_FILES = re.compile(r"(model|experts|optim|optim_experts)_(tp|ep)\d\d(_pp\d\d)?\.pt$|rng_rank\d{3}\.pt$")


def _numpy_array_globals() -> list:
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, np.dtypes.UInt32DType]


def _load_old(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_array_globals() if path.name.startswith("rng_") else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: {describe_load_error(e)}") from None


def _is_old(step_dir: Path) -> bool:
    meta = read_json(step_dir / META)
    return isinstance(meta, dict) and "format_version" not in meta


def _convert_file(old: Path, new_dir: Path, groups: list) -> None:
    data = _load_old(old)
    out = new_dir / f"{old.stem}.safetensors"
    try:
        if old.name.startswith("rng_"):
            write_rng(out, data["torch"], data["python"], data["numpy"], data.get("cuda"))
        elif old.name.startswith("optim"):
            write_tensors(out, data["state"])
            if not groups and data.get("groups"):
                groups.extend(json_safe_groups(data["groups"]))
        else:
            write_tensors(out, data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{old}: not a file of megalong's old checkpoint format "
                              f"({type(e).__name__}: {e})") from None


def convert_step_dir(source: Path, target: Path) -> None:
    """Write `source`'s converted files into `target` (the same directory, or a copy of its other
    files), meta.json last."""
    meta = read_json(source / META)
    old_files = sorted(p for p in source.iterdir() if OLD_FILES.match(p.name))
    strays = sorted(p.name for p in source.glob("*.pt") if not OLD_FILES.match(p.name))
    if strays:
        raise CheckpointError(f"{source}: {strays} are not files of megalong's old checkpoint format; "
                              "nothing was converted")
    groups: list = []
    for old in old_files:
        _convert_file(old, target, groups)
    meta = {"format_version": FORMAT_VERSION, **meta}
    if groups:
        meta["optimizer_param_groups"] = groups
    write_text_atomically(target / META, json.dumps(meta, indent=1))
    if source == target:
        _remove_converted(source)


def _remove_converted(step_dir: Path) -> None:
    """The old files of a converted step directory (also those an interrupted conversion left)."""
    for old in step_dir.iterdir():
        if OLD_FILES.match(old.name) and (step_dir / f"{old.stem}.safetensors").is_file():
            old.unlink()


def _step_dirs(src: Path) -> list[Path]:
    if (src / META).is_file():
        return [src]
    return sorted(p for p in src.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file())


def convert(src: str | Path, dst: str | Path | None = None) -> list[Path]:
    """Convert SRC (a step directory or a save_dir) in place, or into the new DST; returns the
    converted step directories."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    todo = [p for p in _step_dirs(src) if _is_old(p)]
    if dst is None:
        for step_dir in _step_dirs(src):
            if step_dir in todo:
                convert_step_dir(step_dir, step_dir)
            else:
                _remove_converted(step_dir)
        return todo
    if not todo:
        return []
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; name a new directory")
    tmp = dst.with_name(f".{dst.name}.convert.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=lambda folder, names: [n for n in names if OLD_FILES.match(n)
                                                           and (Path(folder) / META).is_file()])
    try:
        for step_dir in todo:
            convert_step_dir(step_dir, tmp / step_dir.relative_to(src))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dst)
    return [dst / step_dir.relative_to(src) for step_dir in todo]
