"""The plain torch engine: one data-parallel rank (tensor, pipeline and expert parallelism as
configured), megalong's AdamW (megalong/train/optim.py), megatron-core's pipeline schedules with
`parallel.pipeline` > 1 (megalong/train/pipeline.py). megalong/train/megatron_engine.py derives
the megatron-core DDP engine from it: they differ only in how gradients are zeroed, accumulated
and stepped.

With train.nonfinite: skip, a step whose gradient norm (the same on every rank: it is reduced over
the TP, EP and PP groups) is not finite is dropped on the device, without a host sync: the fused
AdamW kernel skips the update, weight decay and the step count when `found_inf` is set, as it does
for torch's GradScaler. (Otherwise the run stops at the next check.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from megalong.checkpoint.format import AdamState, checkpoint_format
from megalong.checkpoint.step import CheckpointInfo
from megalong.config import Config
from megalong.moe.layer import moe_aux_loss, update_router_biases
from megalong.parallel.distributed import ParallelLayout
from megalong.train import losses
from megalong.train.engine import StepResult
from megalong.train.optim import build_optimizer, clip_gradients, reduce_tied_embedding_gradients
from megalong.train.pipeline import pipeline_forward_backward

Batch = dict[str, torch.Tensor]


class TorchEngine:
    checkpoint_engine = "megatron"

    def __init__(self, chunks: list[torch.nn.Module], cfg: Config, layout: ParallelLayout):
        self.chunks, self.cfg, self.layout = chunks, cfg, layout
        self.pipeline = layout.pipeline_parallel > 1
        self.n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data_parallel)
        self.run_chunks = self.wrap(chunks)
        self.optimizer = self.build_optimizer()
        self.format = checkpoint_format(cfg.train.checkpoint_format)

    # --- what a derived engine changes ---

    def wrap(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """The modules the forward runs through (the chunks themselves here)."""
        return chunks

    def build_optimizer(self) -> Any:
        return build_optimizer(torch.nn.ModuleList(self.chunks), self.cfg.train)

    def zero_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, micro_batches: Iterable[Batch], backward: Callable[[Batch], None]) -> None:
        """`backward(batch)` for each micro-batch (without pipeline stages)."""
        for batch in micro_batches:
            backward(batch)

    def apply_update(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and step; returns (grad norm, 1.0 if the update was applied else 0.0) as device
        tensors."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.pipeline:
            reduce_tied_embedding_gradients(self.chunks)
        norm = clip_gradients([p for g in self.optimizer.param_groups for p in g["params"]],
                              self.cfg.train.grad_clip)
        applied = torch.isfinite(norm).float()
        if self.cfg.train.nonfinite == "skip":
            if not self.optimizer.defaults.get("fused"):
                raise RuntimeError("train.nonfinite: skip needs the fused AdamW of build_optimizer")
            self.optimizer.grad_scale, self.optimizer.found_inf = None, 1.0 - applied
        self.optimizer.step()
        return norm, applied

    def adam_state(self) -> AdamState:
        return self.optimizer.state

    def load_adam_state(self, state: AdamState) -> None:
        for param, entries in state.items():
            self.optimizer.state[param] = {k: v.clone() for k, v in entries.items()}

    def describe(self) -> list[str]:
        return []

    # --- the same for both ---

    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def model(self) -> torch.nn.Module:
        """What the forward runs: the one module, or with pipeline stages the list of chunks."""
        return torch.nn.ModuleList(self.run_chunks) if self.pipeline else self.run_chunks[0]

    def train(self) -> None:
        self.model.train()

    def step(self, micro_batches: Iterable[Batch], lr: float) -> StepResult:
        """One optimizer step; the gradient is that of the sum of the LM and MoE auxiliary losses
        (megatron's schedule runs forward and backward with pipeline stages)."""
        cfg, device, n_micro = self.cfg, self.layout.device, self.n_micro
        self.zero_gradients()
        if self.pipeline:
            lm, aux = pipeline_forward_backward(self.run_chunks, micro_batches, n_micro,
                                                lambda: losses.autocast(cfg, device))
        else:
            lm = torch.zeros((), device=device)
            aux = torch.zeros((), device=device)
            model = self.run_chunks[0]

            def backward(batch: Batch) -> None:
                nonlocal lm, aux
                with losses.autocast(cfg, device):
                    loss = losses.lm_loss(model, batch) / n_micro
                    extra = moe_aux_loss(model, grad_scale=1.0 / n_micro)
                    extra = extra / n_micro if extra is not None else torch.zeros((), device=device)
                (loss + extra).backward()
                lm += loss.detach()
                aux += extra.detach()

            self.accumulate(micro_batches, backward)
        norm, applied = self.apply_update(lr)
        update_router_biases(torch.nn.ModuleList(self.chunks), applied)
        return StepResult(losses.mean_over_data_parallel(lm), losses.mean_over_data_parallel(aux), norm, applied)

    def evaluate(self, micro_batches: Iterable[Batch], n_micro: int) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            if self.pipeline:
                with torch.no_grad():
                    lm, _ = pipeline_forward_backward(self.run_chunks, micro_batches, n_micro,
                                                      lambda: losses.autocast(self.cfg, self.layout.device),
                                                      forward_only=True)
                return lm
            return losses.held_out_loss(model, micro_batches, self.cfg, self.layout.device)
        finally:
            model.train(was_training)

    def save(self, step_dir: Path, step: int) -> dict:
        return self.format.save(step_dir, step, self.cfg, self, self.layout)

    def load(self, info: CheckpointInfo) -> None:
        checkpoint_format(info.meta.get("format", "megalong")).load(info, self.cfg, self, self.layout)
