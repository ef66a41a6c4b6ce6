"""The step-directory layout of a `train.save_dir` (names, `latest`, which directories are complete
checkpoints), and the rules that keep it safe:

* a fresh run (no `train.load`) refuses a save_dir that already holds another run's checkpoints,
  unless `train.overwrite: true` (then they, and the metrics.jsonl that recorded them, are deleted
  when the run starts);
* `train.keep_last: N` deletes all but the newest N complete checkpoints after each save, never the
  one just written nor the one the run resumed from. A checkpoint is deleted by renaming it to a
  hidden `.step_XXXXXXXX.deleting` first, so a process killed while deleting leaves either a whole
  checkpoint or a hidden directory that is never taken for one (and is removed by the next cleanup).

Torch-free (torch.distributed is imported only to wait for the other ranks), so that the launchers'
pre-flight check (megalong/preflight.py) refuses such a save_dir before any process starts.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from megalong.config import Config
from megalong.errors import CheckpointError

META = "meta.json"  # a step directory's meta.json is written last: one holding it is complete
LATEST = "latest"  # the name of the newest complete checkpoint (replaced atomically)
STEP_DIR = re.compile(r"step_(\d+)$")
DELETING = ".deleting"
METRICS = "metrics.jsonl"  # written by the run beside its checkpoints (megalong/train/run_log.py)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def temporary_name(final: Path) -> Path:
    """Where a step directory is written before it is complete (renamed to `final` then)."""
    return final.with_name(f".{final.name}.tmp")


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """The complete step directories of save_dir, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def find_latest(save_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under save_dir, or None."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    if pointer.is_file():
        candidate = save_dir / pointer.read_text(errors="replace").strip()
        if STEP_DIR.match(candidate.name) and (candidate / META).is_file():
            return candidate
    complete = complete_checkpoints(save_dir)
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a save_dir whose newest complete checkpoint is taken."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file, not a checkpoint directory (give a step_* directory "
                              "or the train.save_dir holding them)")
    found = find_latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint there (expected {META} in it or in "
                              "one of its step_* directories)")
    return found


def resume_path(cfg: Config) -> Optional[Path]:
    """The checkpoint `train.load` names (None: a fresh run)."""
    load = cfg.train.load
    if not load:
        return None
    if load == "auto":
        return find_latest(cfg.train.save_dir) if cfg.train.save_dir else None
    return resolve_checkpoint(load)


def _inside(path: Path, directory: Path) -> bool:
    return directory.resolve() in path.resolve().parents


def replaced_checkpoints(cfg: Config) -> list[Path]:
    """The checkpoints of another run in `train.save_dir` that this run would replace (to be
    deleted by prepare_save_dir with `train.overwrite: true`); without it, a CheckpointError.
    Reads only: the pre-flight check calls it too."""
    t = cfg.train
    if not t.save_dir:
        return []
    save_dir = Path(t.save_dir)
    existing = complete_checkpoints(save_dir)
    resumed = resume_path(cfg)
    if not existing or (resumed is not None and _inside(resumed, save_dir)):
        return []  # nothing to lose, or the run continues its own checkpoints
    if not t.overwrite:
        names = ", ".join(p.name for p in existing[-3:]) + (" ..." if len(existing) > 3 else "")
        raise CheckpointError(
            f"{save_dir}: already holds {len(existing)} checkpoint(s) of another run ({names}), which "
            "this run would replace; resume them with train.load: auto, choose another train.save_dir, "
            "or set train.overwrite: true to delete them")
    return existing


def prepare_save_dir(cfg: Config, rank: int = 0) -> None:
    """Before the run's first step, after every other check: refuse a fresh run into a save_dir
    holding another run's checkpoints, or, with `train.overwrite: true`, delete them (rank 0;
    every rank calls this)."""
    import torch.distributed as dist

    existing = replaced_checkpoints(cfg)
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 deletes anything
    if existing and rank == 0:
        save_dir = Path(cfg.train.save_dir)
        for path in existing:
            remove_checkpoint(path)
        (save_dir / LATEST).unlink(missing_ok=True)
        (save_dir / METRICS).unlink(missing_ok=True)  # their record: the new run starts its own
    if dist.is_initialized():
        dist.barrier()


def remove_checkpoint(path: Path) -> None:
    """Rename to a hidden name (atomic: from then on it is no checkpoint), then delete."""
    hidden = path.with_name(f".{path.name}{DELETING}")
    if hidden.exists():
        shutil.rmtree(hidden)
    path.rename(hidden)
    shutil.rmtree(hidden)


def remove_old_checkpoints(save_dir: Path, keep_last: int, newest: Path,
                           protected: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (oldest first), never `newest`
    nor `protected`; also the remains of a cleanup that was killed. Returns what was deleted."""
    for leftover in save_dir.glob(f".step_*{DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    keep = {p.resolve() for p in complete_checkpoints(save_dir)[-keep_last:]}
    keep |= {newest.resolve()} | ({protected.resolve()} if protected is not None else set())
    deleted = []
    for path in complete_checkpoints(save_dir):
        if path.resolve() not in keep:
            remove_checkpoint(path)
            deleted.append(path)
    return deleted
