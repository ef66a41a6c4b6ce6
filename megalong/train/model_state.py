"""A rank's weights and Adam state under the whole model's names (global layer numbers), and back:
what makes checkpoints layout-free. Saving names every entry as the one-process model does;
loading merges the parts and takes the loading rank's slice (megalong/model/tp_shard.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megalong.config import Config
from megalong.model.tp_shard import partition_dims, split_tensor_parallel
from megalong.parallel.distributed import ParallelLayout

OPTIM_SEP = "/"  # optimizer entries are named "<parameter name>/<state key>"
TIED_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def chunks_of(model) -> list[torch.nn.Module]:
    """A rank's model chunks: one module, or the list of its virtual pipeline stages."""
    if isinstance(model, (list, tuple, torch.nn.ModuleList)):
        return list(model)
    return [model]


def _offset(chunk: torch.nn.Module) -> int:
    from megalong.model.gpt import layer_offset

    return layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0


def global_names(chunk: torch.nn.Module, local_names) -> list[str]:
    from megalong.model.gpt import to_global_names

    return list(to_global_names(dict.fromkeys(local_names), _offset(chunk)))


def global_state(model, tied: bool) -> dict[str, torch.Tensor]:
    """This rank's weights under the whole model's names. The last stage's copy of tied
    embeddings is left out: the one-process model has no such entry."""
    state: dict[str, torch.Tensor] = {}
    for chunk in chunks_of(model):
        local = chunk.state_dict()
        state.update(zip(global_names(chunk, local), local.values()))
    if tied and TIED_EMBEDDING not in state:
        state.pop(OUTPUT_LAYER, None)
    return state


def param_names(model) -> dict[torch.nn.Parameter, str]:
    names: dict[torch.nn.Parameter, str] = {}
    for chunk in chunks_of(model):
        params = dict(chunk.named_parameters())
        for param, name in zip(params.values(), global_names(chunk, params)):
            names.setdefault(param, name)
    return names


def partition_dims_global(model) -> dict[str, int | None]:
    """partition_dims of every chunk, under global layer names."""
    dims: dict[str, int | None] = {}
    for chunk in chunks_of(model):
        local = partition_dims(chunk)
        dims.update(zip(global_names(chunk, local), local.values()))
    return dims


def loading_dims(model, tied: bool) -> dict[str, int | None]:
    """partition_dims_global, with the tied embedding split like the last stage's copy of it."""
    dims = partition_dims_global(model)
    if tied and OUTPUT_LAYER in dims:
        dims.setdefault(TIED_EMBEDDING, dims[OUTPUT_LAYER])
    return dims


def optimizer_state(model, optimizer, tied: bool) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state under the parameters' global names, so that it can be merged
    and re-split for another layout like the weights."""
    from megalong.train.megatron_dp import adam_state

    whole = adam_state(optimizer)  # gathered from the shards of megatron's distributed optimizer
    state = {}
    for param, name in param_names(model).items():
        if tied and name == OUTPUT_LAYER:
            continue  # the same state as the first stage's embedding
        for key, value in whole.get(param, {}).items():
            state[f"{name}{OPTIM_SEP}{key}"] = value
    return state


def set_optimizer_state(model, optimizer, state: dict[str, torch.Tensor]) -> None:
    from megalong.train.megatron_dp import load_adam_state

    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, entry = key.rsplit(OPTIM_SEP, 1)
        by_name.setdefault(name, {})[entry] = value
    by_param = {}
    for param, name in param_names(model).items():
        if name == OUTPUT_LAYER and name not in by_name:
            name = TIED_EMBEDDING  # tied: the last stage's copy
        if name in by_name:
            by_param[param] = by_name[name]
    load_adam_state(optimizer, by_param)


def optimizer_dims(dims: dict[str, int | None]) -> dict[str, int | None]:
    return {f"{n}{OPTIM_SEP}{k}": d for n, d in dims.items() for k in ("exp_avg", "exp_avg_sq")}


def gathered(dims: dict) -> dict:
    """The union of every rank's dict (each pipeline stage knows only its own layers)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dims
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dims)
    out = {}
    for part in parts:
        out.update(part)
    return out


def is_expert_key(name: str) -> bool:
    """State-dict keys of expert weights (split over expert-parallel ranks along dim 0)."""
    return ".mlp.experts.w" in name


def first_holder(key: tuple) -> bool:
    """Whether this process is the lowest rank holding `key` (all ranks call this together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    return keys.index(key) == dist.get_rank()


def rank_slice(full: dict[str, torch.Tensor], dims: dict, cfg: Config, layout: ParallelLayout,
               wanted: set[str]) -> dict[str, torch.Tensor]:
    """This rank's slice of a merged state: its TP slice, its experts."""
    out = split_tensor_parallel({k: v for k, v in full.items() if k in wanted}, dims,
                                layout.tensor_parallel, layout.tensor_rank, cfg.model.gated_mlp)
    if layout.expert_parallel > 1:
        for k, v in out.items():
            if is_expert_key(k) and v.ndim:
                out[k] = v.chunk(layout.expert_parallel, dim=0)[layout.expert_rank].clone()
    return out


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor],
                 source: Optional[str] = None) -> None:
    """module.load_state_dict(state, strict) where entries that are not tensors (megatron's
    `_extra_state`, None without Transformer Engine, never saved) keep the module's own value.
    A missing or misshapen weight is a CheckpointError naming `source`."""
    from megalong.train.checkpoint_files import CheckpointError

    own = module.state_dict()
    full = {k: (state[k] if k in state else v) for k, v in own.items() if not isinstance(v, torch.Tensor)}
    full.update(state)
    try:
        module.load_state_dict(full, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{source or 'checkpoint'}: its weights do not fit the model its "
                              f"config describes ({detail[:600]})") from None
