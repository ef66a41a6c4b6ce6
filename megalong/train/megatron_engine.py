"""The megatron-core data-parallel engine: used whenever there is more than one data-parallel rank
(`train.engine: megatron`). The torch engine's step (megalong/train/torch_engine.py) with
megatron-core's DDP and optimizer (megalong/train/megatron_dp.py) in place of AdamW: gradients are
reduced over the data-parallel ranks after the last micro-batch (with pipeline stages, by the
hooks megatron's schedules call), and the optimizer clips and steps, sharded with
`parallel.distributed_optimizer`."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from megalong.checkpoint.format import AdamState
from megalong.train import megatron_dp
from megalong.train.torch_engine import Batch, TorchEngine


class MegatronEngine(TorchEngine):
    def wrap(self, chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        from megalong import compat

        compat.install(cuda_on_cpu=True)  # its buffers and optimizer allocate on torch.cuda.current_device()
        wrapped = megatron_dp.wrap_data_parallel(chunks, self.cfg)
        if self.pipeline:
            megatron_dp.pipeline_hooks(wrapped)
        return wrapped

    def build_optimizer(self) -> Any:
        return megatron_dp.build_megatron_optimizer(self.run_chunks, self.cfg)

    def zero_gradients(self) -> None:
        megatron_dp.zero_gradients(self.run_chunks, self.optimizer)

    def accumulate(self, micro_batches: Iterable[Batch], backward: Callable[[Batch], None]) -> None:
        megatron_dp.accumulate(self.run_chunks, micro_batches, self.n_micro, backward)
        megatron_dp.finalize_gradients(self.run_chunks)

    def apply_update(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        return megatron_dp.step(self.optimizer, lr)

    def adam_state(self) -> AdamState:
        return megatron_dp.adam_state(self.optimizer)  # collective over the data-parallel ranks

    def load_adam_state(self, state: AdamState) -> None:
        megatron_dp.load_adam_state(self.optimizer, state)

    def describe(self) -> list[str]:
        return [megatron_dp.describe(self.optimizer, self.cfg)]
