"""DeepSpeed 0.19.8 without CUDA and without compiling anything (`megalong.compat.install(deepspeed=True)`,
called by megalong/train/deepspeed_engine.py before it imports DeepSpeed).

* `DS_ACCELERATOR=cpu` (unless it is set already): DeepSpeed's CPU accelerator and gloo. Set when
  a DeepSpeed run starts, never at import.
* `deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False` (private): DeepSpeed would
  otherwise compile its shared-memory CPU all-reduce op with ninja on the first
  `deepspeed.initialize` of every machine (minutes on a small CPU, and a stale build lock left
  by a killed process hangs later runs); torch.distributed's gloo does the communication.
* `LOCAL_RANK=0` (unless set): DeepSpeed asks for it; a one-process run has none.
"""
from __future__ import annotations

import os

import torch


def prepare_deepspeed() -> None:
    """Idempotent; the accelerator and op settings only where CUDA is absent."""
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
