"""Validation of a loaded Config, one function per section; runs before any model, data or
process group is built, so a bad config never costs work."""
from __future__ import annotations

from megalong.config.check_model import (
    validate_attention,
    validate_kind_capabilities,
    validate_model_sizes,
    validate_moe,
    validate_positions,
)
from megalong.config.check_parallel import (
    validate_data_parallel,
    validate_deepspeed,
    validate_parallel,
)
from megalong.config.check_run import (
    validate_data,
    validate_execution,
    validate_paths,
    validate_train,
)
from megalong.config.check_context import validate_context
from megalong.config.schema import Config


def validate(cfg: Config, check_paths: bool = True, world_size: int = 1) -> None:
    """Every section's values and how they fit together; `check_paths`: the tokenizer and
    datasets exist; `world_size`: the processes the parallel layout must divide."""
    validate_model_sizes(cfg)
    validate_attention(cfg)
    validate_moe(cfg)
    validate_kind_capabilities(cfg)
    validate_execution(cfg)
    validate_positions(cfg)
    validate_data(cfg)
    validate_train(cfg)
    validate_context(cfg, world_size)  # first: the data-parallel size below divides by it
    validate_parallel(cfg, world_size)
    validate_deepspeed(cfg)
    validate_data_parallel(cfg)
    if check_paths:
        validate_paths(cfg)
