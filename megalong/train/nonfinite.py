"""`train.nonfinite`: what a step whose loss or gradient norm is NaN or infinite does to the run.

stop (default): the run ends with a TrainingError naming the first such step. skip: the step's
update is dropped (no optimizer step, no Adam moment change, no router bias update: the training
step does this on the device, see the engines), the step is counted and logged, and
`train.max_skipped_steps` skipped steps in a row end the run. In both modes no checkpoint is
written while the most recent step was not finite, so the newest checkpoint is always from before
the trouble (the end of a run that finishes after skipped steps still saves: its weights are those
of its last applied update).

The loop hands the guard the host values of every step, in order, when it synchronises anyway
(at log intervals, and before an evaluation or a checkpoint), so the check costs no extra host
synchronisation per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megalong.errors import TrainingError


@dataclass
class NonFiniteGuard:
    policy: str  # "stop" or "skip"
    max_skipped: int
    last_checkpoint: Optional[Path] = None  # the newest good checkpoint (saved or resumed from)
    skipped_total: int = 0
    streak: int = 0  # skipped steps in a row, up to the last step recorded
    streak_start: int = 0

    def _newest(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written before it"
        return f"the newest checkpoint, {self.last_checkpoint}, is from before it"

    def record(self, step: int, loss: float, grad_norm: float, applied: bool) -> Optional[str]:
        """Account for step `step` (1-based); returns a log line for a skipped step, raises
        TrainingError when the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.streak = 0
            return None
        values = f"loss {loss}, gradient norm {grad_norm}"
        if self.policy == "stop":
            raise TrainingError(f"train.nonfinite: step {step} has a non-finite {values}; stopping "
                                f"({self._newest()}). Lower train.lr or raise train.warmup_steps, or set "
                                f"train.nonfinite: skip to drop such steps")
        if applied:  # a non-finite loss whose gradients were finite: nothing could drop it
            raise TrainingError(f"train.nonfinite: step {step} has a non-finite {values}, and its update "
                                f"was applied (nothing could drop it); stopping ({self._newest()})")
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        self.skipped_total += 1
        if self.streak >= self.max_skipped:
            raise TrainingError(f"train.max_skipped_steps: {self.streak} steps in a row (steps "
                                f"{self.streak_start}-{step}) had a non-finite loss or gradient norm and "
                                f"were skipped; stopping ({self._newest()})")
        return (f"step {step}: skipped ({values}); {self.streak} in a row, {self.skipped_total} in "
                f"total (train.max_skipped_steps {self.max_skipped})")

    @property
    def may_save(self) -> bool:
        """Whether the state after the last recorded step may be checkpointed now."""
        return self.streak == 0
