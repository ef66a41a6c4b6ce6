"""The DeepSpeed engine (`train.engine: deepspeed`): ZeRO stages 1-3, optionally with the optimizer
state offloaded to CPU memory, around the same megatron-core model (tensor parallel as configured).

DeepSpeed replaces megalong's data parallelism and optimizer step: it shards the optimizer state
(ZeRO-1), also the gradients (ZeRO-2), also the weights (ZeRO-3) over the data-parallel ranks of
megatron-core's groups (handed to it as `mpu`, so tensor-parallel ranks hold different slices and
the gradient norm is summed over them). The model, its initial weights, the data order, the
learning-rate schedule and the AdamW parameter groups are the megatron engine's, so both engines
give the same losses (tests/test_deepspeed.py).

Supported: any tensor-parallel size, data parallelism, context parallelism (ZeRO over the data x
context ranks, the loss the whole sequence's: tests/test_context_recompute.py), MoE layers with
parallel.expert: 1 at ZeRO-1 and ZeRO-2, fp32 and bf16 (DeepSpeed's bf16 mode: bf16 weights with
fp32 master weights), train.nonfinite: stop, and skip at ZeRO-1 and ZeRO-2 (whose optimizer drops a step with a
non-finite gradient norm itself; ZeRO-3 applies it, so skip is refused there). Refused by the
config validator: pipeline stages, expert parallelism, ZeRO-3 with MoE layers (the backward
pass met expert weights ZeRO-3 had not gathered). bf16 ran on the CPU at ZeRO-1 and ZeRO-2, DP=2
(tests/test_bf16.py: ZeRO-2 beside fp32). The model is built whole on every process
before ZeRO-3 partitions it (deepspeed.zero.Init is not used), so ZeRO-3 saves memory during
training but not while building.

Environment: without CUDA a DeepSpeed run sets DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo)
before importing DeepSpeed, unless it is set already (megalong/compat/deepspeed_cpu.py), and turns off DeepSpeed's shared-memory CPU
all-reduce op (`deepspeed_shm_comm`), which DeepSpeed would otherwise compile with ninja on the first
`deepspeed.initialize` of every machine (minutes on a small CPU, and a stale build lock left by a
killed process hangs later runs); torch.distributed's gloo does the communication. The optimizer is torch's AdamW in every
mode, also with CPU offload (`zero_force_ds_cpu_optimizer: false`), so no DeepSpeed C++/CUDA op
is compiled: install with `DS_BUILD_OPS=0` (the default) and nothing is built.

Checkpoints: megalong/train/deepspeed_checkpoint.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from megatron.core import parallel_state

from megalong import compat
from megalong.checkpoint.step import CheckpointInfo
from megalong.config import Config, deep_merge
from megalong.moe.layer import moe_aux_loss, update_router_biases
from megalong.parallel.distributed import ParallelLayout, data_context_group, data_context_rank, data_context_size
from megalong.train import deepspeed_checkpoint, losses
from megalong.train.engine import StepResult
from megalong.train.optim import build_optimizer


class MegatronMpu:
    """megatron-core's process groups under the names DeepSpeed asks an `mpu` for. Its data-parallel
    group is the data x context ranks (megatron-core's DDP reduces over the same group): ZeRO shards
    over them and averages their gradients, whose sum over a context group is N times the
    sequence's gradient (megalong/parallel/context.py, context_loss)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(data_context_rank)
    get_data_parallel_world_size = staticmethod(data_context_size)
    get_data_parallel_group = staticmethod(data_context_group)


def deepspeed_config(cfg: Config, data_parallel: int, context_parallel: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run: derived from the train section and `deepspeed:`, plus
    the extra keys of deepspeed.config (which may not override the derived ones). DeepSpeed counts
    the micro-batches of all its data-parallel ranks, the context ranks' chunks included, so its
    train_batch_size is the global batch times the context size."""
    t, d = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    derived = {
        "train_batch_size": t.global_batch_size * context_parallel,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * data_parallel),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": cfg.execution.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # megalong's AdamW (torch's), in every ZeRO stage
        "zero_force_ds_cpu_optimizer": False,  # ... also with CPU offload: no C++ op to build
        "steps_per_print": 2**31 - 1,  # megalong logs
    }
    return deep_merge(d.config, derived)


class DeepSpeedEngine:
    checkpoint_engine = "deepspeed"

    def __init__(self, chunks: list[torch.nn.Module], cfg: Config, layout: ParallelLayout):
        compat.install(deepspeed=True)  # before DeepSpeed is imported: its CPU accelerator, no op builds
        import deepspeed

        (model,) = chunks  # no pipeline stages (refused by the config validator)
        self.chunks, self.cfg, self.layout = chunks, cfg, layout
        optimizer = build_optimizer(model, cfg.train)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MegatronMpu(),
                                                    config=deepspeed_config(cfg, layout.data_parallel,
                                                                            layout.context_parallel))

    def describe(self) -> list[str]:
        d, layout = self.cfg.deepspeed, self.layout
        context = f" x context {layout.context_parallel}" if layout.context_parallel > 1 else ""
        return [f"DeepSpeed ZeRO-{d.zero_stage}{' with CPU optimizer offload' if d.offload_optimizer else ''}: "
                f"{layout.world_size} processes (tensor {layout.tensor_parallel} x data "
                f"{layout.data_parallel}{context}) on {layout.device.type}"]

    def train(self) -> None:
        self.engine.train()

    def step(self, micro_batches: Iterable[dict[str, torch.Tensor]], lr: float) -> StepResult:
        engine, device = self.engine, self.layout.device
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        n_micro = engine.gradient_accumulation_steps()
        lm = torch.zeros((), device=device)
        aux_total = torch.zeros((), device=device)
        for batch in micro_batches:
            loss = losses.lm_loss(engine, batch)
            aux = moe_aux_loss(engine.module, grad_scale=1.0 / n_micro)
            engine.backward(loss + aux if aux is not None else loss)  # scaled by 1/n_micro inside
            engine.step()  # the optimizer steps at the last micro-batch only
            lm += loss.detach() / n_micro
            if aux is not None:
                aux_total += aux.detach() / n_micro
        # ZeRO-1/2 drop a step whose gradient norm is not finite (was_step_applied is then False)
        applied = torch.tensor(float(engine.was_step_applied()))
        update_router_biases(engine.module, applied)
        norm = engine.get_global_grad_norm()
        norm = torch.tensor(float(norm) if norm is not None else float("nan"))
        return StepResult(losses.mean_over_data_parallel(lm), losses.mean_over_data_parallel(aux_total),
                          norm, applied)

    def evaluate(self, micro_batches: Iterable[dict[str, torch.Tensor]], n_micro: int) -> torch.Tensor:
        was_training = self.engine.training
        self.engine.eval()
        try:
            return losses.held_out_loss(self.engine, micro_batches, self.cfg, self.layout.device)
        finally:
            self.engine.train(was_training)

    def save(self, step_dir: Path, step: int) -> dict:
        return deepspeed_checkpoint.save_files(step_dir, self.cfg, self.engine, self.layout)

    def load(self, info: CheckpointInfo) -> None:
        deepspeed_checkpoint.load_files(info, self.cfg, self.engine, self.layout)

