"""Weights & Biases as one more destination of the run log (megalong/train/run_log.py): every
scalar the run writes to `metrics.jsonl` goes to the W&B run too, with the resolved config. Rank 0
only. The run id is recorded in each checkpoint's meta.json (`wandb_run_id`), and a run resumed
from that checkpoint continues the same W&B run. `wandb` is imported only when a run uses it."""
from __future__ import annotations

import os
from typing import Any, Optional

from megalong.config import Config, ConfigError

META_KEY = "wandb_run_id"  # meta.json's entry


class WandbLog:
    """A started W&B run, as a metrics sink of the Reporter (megalong/train/metrics.py)."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def checkpoint_meta(self) -> dict[str, str]:
        return {META_KEY: self.run.id}

    def close(self) -> None:
        self.run.finish()


def wandb_enabled(cfg: Config) -> bool:
    w = cfg.train.wandb
    return bool(w.project) and w.mode != "disabled"


def open_wandb(cfg: Config, resumed_id: Optional[str]) -> Optional[WandbLog]:
    """The W&B run of this training run (rank 0 calls it), or None when W&B is off. With
    `resumed_id` (the id stored in the checkpoint resumed from) the same W&B run continues.
    W&B's files go to $WANDB_DIR, else to train.save_dir."""
    if not wandb_enabled(cfg):
        return None
    import wandb

    w, t = cfg.train.wandb, cfg.train
    directory = os.environ.get("WANDB_DIR") or t.save_dir
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        run = wandb.init(project=w.project, entity=w.entity, name=w.name, mode=w.mode, dir=directory,
                         id=resumed_id, resume="allow" if resumed_id else None)
        run.config.update(cfg.to_dict(), allow_val_change=True)
    except wandb.Error as e:  # not logged in, no network, a project one may not write to
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.wandb: W&B could not start the run ({first}); log in with "
                          f"`wandb login`, or set train.wandb.mode: offline") from None
    return WandbLog(run)
