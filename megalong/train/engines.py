"""Which engine (megalong/train/engine.py) runs a config, and the process groups it runs in."""
from __future__ import annotations

import torch

from megalong.config import Config
from megalong.parallel.context import set_layout as set_context_layout
from megalong.parallel.distributed import ParallelLayout, initialize
from megalong.train.engine import Engine


def initialize_for(cfg: Config) -> ParallelLayout:
    """megatron-core's process groups for the run (DeepSpeed: tensor x data only; the config
    validator refuses pipeline stages and expert parallelism with it)."""
    p = cfg.parallel
    set_context_layout(p.context_layout)
    if cfg.train.engine == "deepspeed":
        return initialize(p.tensor, p.backend, context_parallel=p.context)
    return initialize(p.tensor, p.backend, p.expert, pipeline_parallel=p.pipeline,
                      virtual_stages=p.virtual_stages, context_parallel=p.context)


def build_engine(cfg: Config, layout: ParallelLayout, chunks: list[torch.nn.Module]) -> Engine:
    """The engine around this rank's model chunks (built, seeded and on the device)."""
    if cfg.train.engine == "deepspeed":  # DeepSpeed ZeRO runs its own step
        from megalong.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(chunks, cfg, layout)
    # megatron-core DDP and optimizer; with context parallelism it reduces over data x context ranks
    if layout.data_parallel > 1 or layout.context_parallel > 1:
        from megalong.train.megatron_engine import MegatronEngine

        return MegatronEngine(chunks, cfg, layout)
    from megalong.train.torch_engine import TorchEngine

    return TorchEngine(chunks, cfg, layout)
