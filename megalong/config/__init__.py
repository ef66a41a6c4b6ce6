"""Typed run configuration: dataclasses loaded from one or more YAML files, merged, validated.

schema.py     the sections (`model` is the architecture, `execution` how it runs) and derived values
load.py       YAML files + `--set` overrides -> Config: merge, unique keys, key and type checks
migrate.py    keys that moved: refused in a user config, migrated in a checkpoint's saved config
validate.py   one check per section: check_model.py, check_run.py, check_parallel.py
architecture.py  the checkpoint compatibility comparison (architecture keys only)
layers.py, layout.py  layer patterns; pipeline split and padded vocabulary
"""
from megalong.config.architecture import architecture_differences
from megalong.config.check_model import MLP_KINDS
from megalong.config.check_parallel import DEEPSPEED_DERIVED_KEYS
from megalong.config.errors import ConfigError
from megalong.config.layers import expand_layer_pattern
from megalong.config.layout import padded_vocab_size, pipeline_split
from megalong.config.load import (
    MAX_CONFIG_BYTES,
    config_from_dict,
    deep_merge,
    load_config,
    load_raw,
    parse_override,
)
from megalong.config.migrate import MOVED_KEYS, migrate_saved_config
from megalong.config.schema import (
    AxialPositionConfig,
    Config,
    DataConfig,
    DatasetEntry,
    DeepSpeedConfig,
    ExecutionConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megalong.config.validate import validate

__all__ = [
    "DEEPSPEED_DERIVED_KEYS", "MAX_CONFIG_BYTES", "MLP_KINDS", "MOVED_KEYS", "AxialPositionConfig", "Config",
    "ConfigError", "DataConfig", "DatasetEntry", "DeepSpeedConfig", "ExecutionConfig", "ModelConfig",
    "ParallelConfig", "TrainConfig", "architecture_differences", "config_from_dict", "deep_merge",
    "expand_layer_pattern", "load_config", "load_raw", "migrate_saved_config", "padded_vocab_size",
    "parse_override", "pipeline_split", "validate",
]
