"""What the training loop (megalong/train/loop.py) asks of an engine: the one part of a run that
differs between plain torch (megalong/train/torch_engine.py, with megatron-core's pipeline
schedules), megatron-core DDP and its distributed optimizer (megalong/train/megatron_engine.py) and
DeepSpeed ZeRO (megalong/train/deepspeed_engine.py). The loop owns everything else: seeding, data,
the learning-rate schedule, logging, evaluation and checkpoint timing, resume, non-finite steps.
A new engine is a class with these members, and its case in megalong/train/engines.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch

from megalong.checkpoint.step import CheckpointInfo


@dataclass
class StepResult:
    """One optimizer step, as device tensors (read on the host only when the loop synchronises):
    the LM and MoE auxiliary losses (means over micro-batches and data-parallel ranks), the
    gradient norm before clipping, and 1.0 if its update was applied, 0.0 if it was dropped."""

    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    applied: torch.Tensor


class Engine(Protocol):
    checkpoint_engine: str  # meta.json's "engine": which engine can resume its checkpoints
    chunks: list[torch.nn.Module]  # this rank's model chunks, unwrapped (names, MoE stats, state)

    def describe(self) -> list[str]:
        """Log lines about how this engine runs (after the model line)."""
        ...

    def train(self) -> None:
        """Put the model in training mode."""
        ...

    def step(self, micro_batches: Iterable[dict[str, torch.Tensor]], lr: float) -> StepResult:
        """One optimizer step over this rank's micro-batches of a global batch, at learning rate `lr`."""
        ...

    def evaluate(self, micro_batches: Iterable[dict[str, torch.Tensor]], n_micro: int) -> torch.Tensor:
        """The mean LM loss over `n_micro` held-out micro-batches on this rank, in eval mode."""
        ...

    def save(self, step_dir: Path, step: int) -> dict:
        """Write this rank's model and optimizer files into the temporary step directory
        (collective); returns meta.json's entries for them, "format" included."""
        ...

    def load(self, info: CheckpointInfo) -> None:
        """Restore weights and optimizer state from a checked checkpoint (collective)."""
        ...
