"""Weights and Adam state in megatron-core's distributed checkpoint format
(`train.checkpoint_format: megatron`), in the `dist/` sub-directory of a step directory.

Every tensor is a `ShardedTensor` under the whole model's name (global layer numbers), with its
global shape and this rank's offset in it, so megatron-core's `dist_checkpointing.load` reads
only each rank's slice at any tensor/pipeline/expert/data-parallel layout (loading in more than one
process is refused for now by checkpoint.load_checkpoint: it failed under gloo on the CPU):

* TP: split along the dimension recorded on the parameter (`tensor_model_parallel` and
  `partition_dim`, via `tp_shard.partition_dims`): the same record megalong's own format merges
  by, so every module (ours included) is sliced as it is in memory; a parameter without it is
  replicated over TP ranks.
* Gated MLPs (SwiGLU) keep [gate; up] per TP rank, so their fc1 is stored as a (2, ffn, ...)
  tensor, split along dim 1.
* EP: the experts of expert-parallel ranks are slices of the global expert dimension (dim 0).
* Replicas (DP ranks, TP ranks of replicated tensors, the last stage's tied embedding) are marked
  as such: the lowest rank holding a slice writes it.

The sharded state dicts are built from the parameters' recorded sharding rather than from
`GPTModel.sharded_state_dict()`, whose defaults treat modules it does not know as replicated.

Adam's `exp_avg`/`exp_avg_sq` are sharded exactly like their parameters
(`optimizer.<name>.exp_avg`), its `step` is a replicated one-element tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megalong.config import Config
from megalong.parallel.cpu_compat import cuda_on_cpu_temporarily
from megalong.parallel.distributed import ParallelLayout

DIST_DIR = "dist"  # megatron's files (metadata.json, common.pt, __*.distcp) in a step directory
OPTIM_PREFIX = "optimizer."
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _checkpointing():
    from megatron.core import dist_checkpointing

    return dist_checkpointing


def _sharding(name: str, local: torch.Tensor, dims: dict, gated: bool,
              layout: ParallelLayout) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The tensor to store (a view of `local`) and its (axis, rank, fragments) offsets."""
    from megalong.train.checkpoint import is_expert_key

    offsets = []
    dim = dims.get(name)
    data = local
    if dim is not None and gated and "linear_fc1" in name:
        shape = list(local.shape)
        data = local.view(*shape[:dim], 2, shape[dim] // 2, *shape[dim + 1:])
        offsets.append((dim + 1, layout.tensor_rank, layout.tensor_parallel))
    elif dim is not None:
        offsets.append((dim, layout.tensor_rank, layout.tensor_parallel))
    if layout.expert_parallel > 1 and is_expert_key(name) and local.ndim:
        if dim == 0:
            raise ValueError(f"{name}: split over both tensor- and expert-parallel ranks along dim 0")
        offsets.append((0, layout.expert_rank, layout.expert_parallel))
    return data, [o for o in offsets if o[2] > 1]


def _first_holders(slices: list[tuple]) -> list[bool]:
    """For each (key, offsets) slice of this rank, whether it is the lowest rank holding it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [True] * len(slices)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, slices)
    first = {}
    for rank, held in enumerate(everyone):
        for s in held:
            first.setdefault(s, rank)
    return [first[s] == dist.get_rank() for s in slices]


def _sharded(entries: dict[str, tuple[torch.Tensor, list]]) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    keys = sorted(entries)
    holders = _first_holders([(k, tuple(entries[k][1])) for k in keys])
    return {k: ShardedTensor.from_rank_offsets(k, entries[k][0], *entries[k][1],
                                               replica_id=0 if first else 1)
            for k, first in zip(keys, holders)}


def _weights(model, cfg: Config, layout: ParallelLayout) -> dict[str, tuple[torch.Tensor, list]]:
    from megalong.train.checkpoint import _global_state, partition_dims_global

    dims = partition_dims_global(model)
    gated = cfg.model.activation == "swiglu"
    out = {}
    for name, tensor in _global_state(model, cfg.model.tie_embeddings).items():
        if not isinstance(tensor, torch.Tensor):
            continue  # megatron's `_extra_state` placeholders (None without Transformer Engine)
        out[name] = _sharding(name, tensor, dims, gated, layout)
    return out


def _optimizer(model, optimizer: torch.optim.Optimizer, cfg: Config,
               layout: ParallelLayout) -> dict[str, tuple[torch.Tensor, list]]:
    from megalong.train.checkpoint import _param_names, partition_dims_global

    dims = partition_dims_global(model)
    gated = cfg.model.activation == "swiglu"
    out = {}
    for param, name in _param_names(model).items():
        if cfg.model.tie_embeddings and name == "output_layer.weight":
            continue  # the same state as the first stage's embedding
        for key, value in optimizer.state.get(param, {}).items():
            if key in ADAM_KEYS:
                out[f"{OPTIM_PREFIX}{name}.{key}"] = _sharding(name, value, dims, gated, layout)
            elif key == "step":
                out[f"{OPTIM_PREFIX}{name}.step"] = (value.reshape(1), [])
            else:
                raise ValueError(f"checkpoint_format megatron: unexpected optimizer state {key!r}")
    return out


def _in_process_results_queue() -> None:
    """megatron's file writer reports back through a queue that it creates on first use from a
    `spawn` multiprocessing Manager: a new interpreter that re-imports the main module (seconds,
    and megatron again under torchrun). We save synchronously, so writer and reader are this very
    process, and a plain thread-safe queue does."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_distributed(directory: Path, cfg: Config, model, optimizer: torch.optim.Optimizer,
                     layout: ParallelLayout, step: int) -> None:
    """Write weights and Adam state to `directory` (collective; rank 0 creates the directory)."""
    if layout.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = _sharded({**_weights(model, cfg, layout), **_optimizer(model, optimizer, cfg, layout)})
    state["megalong"] = {"step": step, "gated_mlp": cfg.model.activation == "swiglu"}  # common.pt
    _in_process_results_queue()
    with cuda_on_cpu_temporarily():
        _checkpointing().save(state, str(directory))


def load_distributed(directory: Path, cfg: Config, model,
                     optimizer: Optional[torch.optim.Optimizer], layout: ParallelLayout) -> None:
    """Read this rank's slices of weights (and Adam state) into `model` (and `optimizer`)."""
    from megalong.model.gpt import layer_offset, to_global_names
    from megalong.train.checkpoint import _chunks, _param_names, partition_dims_global

    tied = cfg.model.tie_embeddings
    dims = partition_dims_global(model)
    if tied and "output_layer.weight" in dims:  # the last stage's copy is split like the original
        dims.setdefault("embedding.word_embeddings.weight", dims["output_layer.weight"])
    gated = cfg.model.activation == "swiglu"
    stored = set(_checkpointing().load_tensors_metadata(str(directory)))

    def source(name: str) -> str:  # the last stage's tied output layer reads the embedding
        return "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name

    # (checkpoint key, local tensor to fill, its stored view and offsets)
    wanted: list[tuple[str, torch.Tensor, tuple]] = []
    targets = []
    fixed: dict[int, dict] = {}
    for chunk in _chunks(model):
        offset = layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0
        local_state = chunk.state_dict(keep_vars=True)
        global_names = to_global_names(dict.fromkeys(local_state), offset)
        for (local, tensor), name in zip(local_state.items(), global_names):
            if not isinstance(tensor, torch.Tensor):
                fixed.setdefault(id(chunk), {})[local] = tensor  # `_extra_state`: kept as built
                continue
            key = source(name)
            template = torch.empty_like(tensor.detach())
            wanted.append((key, template, _sharding(key, template, dims, gated, layout)))
            targets.append((chunk, local))
    optim_targets = []
    if optimizer is not None:
        for param, name in _param_names(model).items():
            key = source(name)
            for entry in (*ADAM_KEYS, "step"):
                full_key = f"{OPTIM_PREFIX}{key}.{entry}"
                if full_key not in stored:
                    continue
                if entry == "step":
                    template = torch.empty(1, dtype=torch.float32)
                    sharding = (template, [])
                else:
                    template = torch.empty_like(param.detach())
                    sharding = _sharding(key, template, dims, gated, layout)
                wanted.append((full_key, template, sharding))
                optim_targets.append((param, entry))

    missing = sorted({k for k, _, _ in wanted[:len(targets)] if k not in stored})
    if missing:
        from megalong.train.checkpoint import CheckpointError

        raise CheckpointError(f"{directory}: the model's {missing[:5]} are not in the checkpoint")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {f"{i}": ShardedTensor.from_rank_offsets(k, view, *offsets, replica_id=0)
               for i, (k, _, (view, offsets)) in enumerate(wanted)}
    with cuda_on_cpu_temporarily():  # its exchange of metadata puts flags on the CUDA device
        loaded = _checkpointing().load(request, str(directory))
    values = [loaded[f"{i}"].reshape(template.shape) for i, (_, template, _) in enumerate(wanted)]

    per_chunk: dict[int, dict] = {k: dict(v) for k, v in fixed.items()}
    for (chunk, local), value in zip(targets, values[:len(targets)]):
        per_chunk.setdefault(id(chunk), {})[local] = value
    for chunk in _chunks(model):
        chunk.load_state_dict(per_chunk[id(chunk)], strict=True)
    for (param, entry), value in zip(optim_targets, values[len(targets):]):
        optimizer.state[param][entry] = value.reshape(()) if entry == "step" else value.clone()


def load_merged(directory: Path, dims: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """The one-process model's state dict (no optimizer state), read whole from any layout;
    `dims` are the saved model's partition dims (to unfold gated fc1 weights)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ckpt = _checkpointing()
    gated = ckpt.load_common_state_dict(str(directory))["megalong"]["gated_mlp"]
    metadata = ckpt.load_tensors_metadata(str(directory))
    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(v.global_shape, dtype=v.dtype), replica_id=0)
               for k, v in metadata.items() if not k.startswith(OPTIM_PREFIX)}
    own_group = not dist.is_initialized()  # megatron's load gathers metadata over a group
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with cuda_on_cpu_temporarily():
            loaded = ckpt.load(request, str(directory))  # with the common (non-tensor) entries
        out = {k: loaded[k] for k in request}
    finally:
        if own_group:
            dist.destroy_process_group()
    for name, value in out.items():
        dim = dims.get(name)
        if gated and dim is not None and "linear_fc1" in name:
            out[name] = value.flatten(dim, dim + 1)
    return out
