"""Test-only hooks, installed by tests (megalong has no test code path): a NaN put into the loss of
chosen training steps, and a record of whether each step changed the weights (buffers such as
MoE router biases included) and Adam's state."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

import megalong.train.losses as losses
import megalong.train.pipeline as pipeline
from megalong.train.torch_engine import TorchEngine


class Recorder:
    def __init__(self, bad_steps, inject_rank: int = 0, calls_per_step: Optional[int] = None):
        self.bad_steps = set(bad_steps)
        self.inject_rank = inject_rank
        self.calls_per_step = calls_per_step  # for engines whose step is not recorded (DeepSpeed)
        self.calls = 0
        self.steps_run = 0
        self.step: Optional[int] = None  # the 1-based step being run
        self.unchanged: dict[int, tuple[bool, bool]] = {}  # step -> (weights equal, Adam state equal)

    def poison(self, loss: torch.Tensor, training: bool) -> torch.Tensor:
        step = self.step
        if self.calls_per_step is not None and training:
            step = self.calls // self.calls_per_step + 1
            self.calls += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if step in self.bad_steps and rank == self.inject_rank:
            return loss * float("nan")
        return loss


def _tensors(engine: TorchEngine) -> tuple[dict, dict]:
    model = torch.nn.ModuleList(engine.chunks)
    names = {p: n for n, p in model.named_parameters()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    adam = {names[p]: {k: torch.as_tensor(v).detach().clone() for k, v in state.items()}
            for p, state in engine.adam_state().items() if p in names}
    return weights, adam


def _equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def install(recorder: Recorder) -> Callable[[], None]:
    """Put the hooks in place; returns the function that takes them out again."""
    originals = {(losses, "lm_loss"): losses.lm_loss, (pipeline, "masked_mean"): pipeline.masked_mean,
                 (TorchEngine, "step"): TorchEngine.step}
    lm_loss, masked_mean = losses.lm_loss, pipeline.masked_mean

    def poisoned_lm_loss(model, batch):
        return recorder.poison(lm_loss(model, batch), model.training)

    def poisoned_masked_mean(per_token, loss_mask):
        return recorder.poison(masked_mean(per_token, loss_mask), True)

    def recorded(step_fn):
        def run(engine, *args):
            recorder.steps_run += 1
            recorder.step = recorder.steps_run
            before = _tensors(engine)
            try:
                return step_fn(engine, *args)
            finally:
                after = _tensors(engine)
                recorder.unchanged[recorder.step] = (_equal(before[0], after[0]), _equal(before[1], after[1]))
                recorder.step = None
        return run

    losses.lm_loss, pipeline.masked_mean = poisoned_lm_loss, poisoned_masked_mean
    TorchEngine.step = recorded(TorchEngine.step)  # the megatron-core DDP engine's step too

    def uninstall() -> None:
        for (module, name), value in originals.items():
            setattr(module, name, value)
    return uninstall
