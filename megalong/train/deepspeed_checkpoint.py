"""The DeepSpeed engine's checkpoint files, inside the shared step-directory layout
(megalong/checkpoint/step.py: temporary name, commit, `latest`, keep_last, RNG states, config,
tokenizer, meta.json with `"engine": "deepspeed"`): `deepspeed/` (DeepSpeed's own files: module,
ZeRO shards of the optimizer state) and `model_tpXX.safetensors` (whole weights of each
tensor-parallel rank, gathered from the ZeRO-3 shards, in megalong's format: `megalong export` and
`generate` read them like any other). Resuming needs the same ZeRO stage and layout.

DeepSpeed's own files are pickles, which DeepSpeed 0.19.8 reads with `torch.load(weights_only=
False)`: megalong lets it read them only inside megalong/train/library_loads.py's
`pickles_without_code()` (weights_only forced, DeepSpeed's four classes allowed), so they never
run code either.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megalong.checkpoint.files import write_tensors
from megalong.checkpoint.native import part_suffix
from megalong.checkpoint.step import CheckpointInfo
from megalong.config import Config
from megalong.errors import CheckpointError
from megalong.model.tp_shard import partition_dims
from megalong.parallel.distributed import ParallelLayout, data_context_rank, data_context_size

DEEPSPEED_TAG = "deepspeed"  # the sub-directory of a step directory holding DeepSpeed's files


def gathered_parameters(engine: Any, params) -> Any:
    """Context in which ZeRO-3's partitioned parameters are whole (a no-op for stages 1-2)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), enabled=engine.zero_optimization_stage() == 3)


def save_files(step_dir: Path, cfg: Config, engine: Any, layout: ParallelLayout) -> dict[str, Any]:
    """DeepSpeed's files and the whole weights (collective); returns meta.json's entries."""
    engine.save_checkpoint(str(step_dir), tag=DEEPSPEED_TAG, save_latest=False)
    module = engine.module
    with gathered_parameters(engine, module.parameters()):
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        dims = partition_dims(module)
    if layout.data_rank == 0 and layout.context_rank == 0:  # one copy per tensor-parallel rank
        write_tensors(step_dir / f"model_{part_suffix(layout.tensor_rank, 0, 1)}.safetensors", state)
    return {"format": "megalong", "engine": "deepspeed", "zero_stage": cfg.deepspeed.zero_stage,
            "partition_dims": dims}


def _deepspeed_files(engine: Any, layout: ParallelLayout) -> list[str]:
    """The files (glob patterns) DeepSpeed 0.19.8 reads on this rank: its model states, and the
    ZeRO optimizer states of every data x context rank (`bf16_` prefixed in its bf16 mode)."""
    tp = f"mp_rank_{layout.tensor_rank:02d}"
    model = (f"zero_pp_rank_{data_context_rank()}_{tp}_model_states.pt" if engine.zero_optimization_stage() == 3
             else f"{tp}_model_states.pt")
    return [model, *(f"*zero_pp_rank_{d}_{tp}_optim_states.pt" for d in range(data_context_size()))]


def _load_engine_files(engine: Any, step_dir: Path, layout: ParallelLayout) -> None:
    """DeepSpeed's own files, read through megalong/train/library_loads.py: weights_only=True with
    DeepSpeed's few classes allowed; a file it cannot read is a CheckpointError naming it."""
    from megalong.train.library_loads import deepspeed_safe_globals, describe_load_error, pickles_without_code

    directory = step_dir / DEEPSPEED_TAG
    for name in _deepspeed_files(engine, layout):
        if not list(directory.glob(name)):
            raise CheckpointError(f"{directory / name.lstrip('*')}: missing (the checkpoint is incomplete)")
    reader = engine.checkpoint_engine
    read = reader.load

    def load_naming_the_file(path, map_location=None):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
        try:
            return read(path, map_location=map_location)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise CheckpointError(f"{path}: {describe_load_error(e)}") from None

    reader.load = load_naming_the_file
    try:
        with pickles_without_code(deepspeed_safe_globals()):
            engine.load_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    except CheckpointError:
        raise
    except Exception as e:  # DeepSpeed asserts on files that do not fit (another layout, ...)
        raise CheckpointError(f"{directory}: DeepSpeed cannot load it "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    finally:
        del reader.load  # the engine's own method again


def load_files(info: CheckpointInfo, cfg: Config, engine: Any, layout: ParallelLayout) -> None:
    """Restore weights and ZeRO optimizer state (the step directory is checked already)."""
    meta = info.meta
    for key, now in (("zero_stage", cfg.deepspeed.zero_stage), ("data_parallel", layout.data_parallel),
                     ("tensor_parallel", layout.tensor_parallel), ("world_size", layout.world_size)):
        if meta[key] != now:
            raise CheckpointError(f"checkpoint {info.path} has {key}={meta[key]} but this run has "
                                  f"{now}; DeepSpeed resumes only at the same ZeRO stage and layout")
    _load_engine_files(engine, info.path, layout)
