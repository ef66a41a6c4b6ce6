"""Weights and Adam state in megatron-core's distributed checkpoint format
(`train.checkpoint_format: megatron`), in the `dist/` sub-directory of a step directory.

Every tensor is a `ShardedTensor` under the whole model's name (global layer numbers), with its
global shape and this rank's offset in it, so megatron-core's `dist_checkpointing.load` reads
only each rank's slice at any tensor/pipeline/expert/data-parallel layout, in one process or many:

* TP: split along the dimension recorded on the parameter (`tensor_model_parallel` and
  `partition_dim`, via `tp_shard.partition_dims`): the same record megalong's own format merges
  by, so every module (ours included) is sliced as it is in memory; a parameter without it is
  replicated over TP ranks.
* Gated MLPs (SwiGLU) keep [gate; up] per TP rank, so their fc1 is stored as a (2, ffn, ...)
  tensor, split along dim 1.
* EP: the experts of expert-parallel ranks are slices of the global expert dimension (dim 0).
* Replicas (DP ranks, TP ranks of replicated tensors, the last stage's tied embedding) are marked
  as such: the lowest rank holding a slice writes it. Loading marks them the same way: megatron's
  `load` checks, on rank 0 only, that the main replicas (`replica_id` 0) of every requested
  tensor cover it exactly once, and raises there while the other ranks go on into the load's
  collectives and wait for rank 0 (under torchrun the job dies; elsewhere it hangs).

The sharded state dicts are built from the parameters' recorded sharding rather than from
`GPTModel.sharded_state_dict()`, whose defaults treat modules it does not know as replicated.

Adam's `exp_avg`/`exp_avg_sq` are sharded exactly like their parameters
(`optimizer.<name>.exp_avg`), its `step` is a replicated one-element tensor. They are read and set
whole per parameter through megalong/train/megatron_dp.py (`adam_state`, `load_adam_state`), so
megatron-core's optimizer (data-parallel runs, sharded with `parallel.distributed_optimizer`) is
saved and loaded like a torch AdamW.

Reading never runs code: megatron's files are checked first (`verify_dist_dir`: common.pt with
`weights_only=True`, `.metadata` through an allow-list unpickler, every data file present and as
long as the metadata says), and megatron-core's own reads run inside
megalong/train/library_loads.py's `pickles_without_code()`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megalong.config import Config
from megalong import compat
from megalong.parallel.distributed import ParallelLayout
from megalong.train.checkpoint_files import CheckpointError, read_json
from megalong.train.library_loads import describe_load_error, pickles_without_code, read_dcp_metadata
from megalong.train.model_state import (chunks_of, global_names, global_state, is_expert_key, loading_dims,
                                        param_names, partition_dims_global)

DIST_DIR = "dist"  # megatron's files (metadata.json, common.pt, __*.distcp) in a step directory
OPTIM_PREFIX = "optimizer."
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _checkpointing():
    from megatron.core import dist_checkpointing

    return dist_checkpointing


def _sharding(name: str, local: torch.Tensor, dims: dict, gated: bool,
              layout: ParallelLayout) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The tensor to store (a view of `local`) and its (axis, rank, fragments) offsets."""
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


def _everyone(value) -> list:
    """`value` from every rank (collective), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _first_holders(slices: list[tuple]) -> list[bool]:
    """For each (key, offsets) slice of this rank, whether it is the lowest rank holding it
    (collective)."""
    first = {}
    for rank, held in enumerate(_everyone(slices)):
        for s in held:
            first.setdefault(s, rank)
    me = dist.get_rank() if dist.is_initialized() else 0
    return [first[s] == me for s in slices]


def _sharded_tensors(entries: list[tuple[str, torch.Tensor, list]]) -> list:
    """`ShardedTensor`s for (key, stored view, offsets) entries, the lowest rank holding a slice
    its main replica (collective)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    holders = _first_holders([(k, tuple(offsets)) for k, _, offsets in entries])
    return [ShardedTensor.from_rank_offsets(k, view, *offsets, replica_id=0 if first else 1)
            for (k, view, offsets), first in zip(entries, holders)]


def _sharded(entries: dict[str, tuple[torch.Tensor, list]]) -> dict:
    keys = sorted(entries)
    return dict(zip(keys, _sharded_tensors([(k, *entries[k]) for k in keys])))


def _weights(model, cfg: Config, layout: ParallelLayout) -> dict[str, tuple[torch.Tensor, list]]:
    dims = partition_dims_global(model)
    gated = cfg.model.gated_mlp
    out = {}
    for name, tensor in global_state(model, cfg.model.tie_embeddings).items():
        if not isinstance(tensor, torch.Tensor):
            continue  # megatron's `_extra_state` placeholders (None without Transformer Engine)
        out[name] = _sharding(name, tensor, dims, gated, layout)
    return out


def _optimizer(model, optimizer, cfg: Config,
               layout: ParallelLayout) -> dict[str, tuple[torch.Tensor, list]]:
    from megalong.train.megatron_dp import adam_state

    dims = partition_dims_global(model)
    gated = cfg.model.gated_mlp
    whole = adam_state(optimizer)  # collective for megatron's distributed optimizer
    out = {}
    for param, name in param_names(model).items():
        if cfg.model.tie_embeddings and name == "output_layer.weight":
            continue  # the same state as the first stage's embedding
        for key, value in whole.get(param, {}).items():
            if key in ADAM_KEYS:
                out[f"{OPTIM_PREFIX}{name}.{key}"] = _sharding(name, value, dims, gated, layout)
            elif key == "step":
                out[f"{OPTIM_PREFIX}{name}.step"] = (value.reshape(1), [])
            else:
                raise ValueError(f"checkpoint_format megatron: unexpected optimizer state {key!r}")
    return out


def save_distributed(directory: Path, cfg: Config, model, optimizer,
                     layout: ParallelLayout, step: int) -> None:
    """Write weights and Adam state to `directory` (collective; rank 0 creates the directory)."""
    if layout.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = _sharded({**_weights(model, cfg, layout), **_optimizer(model, optimizer, cfg, layout)})
    state["megalong"] = {"step": step, "gated_mlp": cfg.model.gated_mlp}  # common.pt
    compat.results_queue_in_process()  # megatron's writer reports in this process (megalong/compat)
    with compat.cuda_on_cpu_temporarily():
        _checkpointing().save(state, str(directory))


def verify_dist_dir(directory: Path) -> dict:
    """Check megatron's files before megatron reads them, so that a missing, truncated or foreign
    file is a CheckpointError naming it; returns common.pt's "megalong" entry. Its two pickled
    files are read without running code: common.pt with weights_only=True, .metadata through
    megalong/train/library_loads.py's RestrictedUnpickler."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing (the checkpoint is incomplete)")
    if not isinstance(read_json(directory / "metadata.json"), dict):
        raise CheckpointError(f"{directory / 'metadata.json'}: expected a JSON object")
    common_file = directory / "common.pt"
    if not common_file.is_file():
        raise CheckpointError(f"{common_file}: missing (the checkpoint is incomplete)")
    try:
        common = torch.load(common_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"{common_file}: {describe_load_error(e)}") from None
    ours = common.get("megalong") if isinstance(common, dict) else None
    if not isinstance(ours, dict) or not isinstance(ours.get("gated_mlp"), bool):
        raise CheckpointError(f"{common_file}: expected megalong's entry {{'megalong': {{'step': ..., "
                              f"'gated_mlp': ...}}}}, got {common!r:.200}")
    metadata_file = directory / ".metadata"
    metadata = read_dcp_metadata(metadata_file)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not hasattr(metadata, "state_dict_metadata"):
        raise CheckpointError(f"{metadata_file}: not a torch.distributed.checkpoint metadata file")
    needed: dict[str, int] = {}
    for info in storage.values():
        name, end = str(getattr(info, "relative_path", "")), getattr(info, "offset", 0) + getattr(info, "length", 0)
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
        if path.stat().st_size < end:
            raise CheckpointError(f"{path}: truncated ({path.stat().st_size} bytes; its metadata "
                                  f"needs {end})")
    return ours


def _megatron(call, directory: Path, *args):
    """A megatron-core dist_checkpointing call on `directory`, its pickles read without code and
    its failures a CheckpointError."""
    try:
        with pickles_without_code():
            return call(*args, str(directory))
    except CheckpointError:
        raise
    except Exception as e:  # megatron-core and torch.distributed.checkpoint raise many kinds
        raise CheckpointError(f"{directory}: megatron-core cannot read it: {describe_load_error(e)}") from None


def load_distributed(directory: Path, cfg: Config, model, optimizer, layout: ParallelLayout) -> None:
    """Read this rank's slices of weights (and Adam state) into `model` (and `optimizer`, a torch
    or megatron-core optimizer, or None). Collective: every rank of the job calls it."""
    from megalong.train.megatron_dp import load_adam_state
    from megalong.train.model_state import load_weights

    verify_dist_dir(directory)
    tied = cfg.model.tie_embeddings
    dims = loading_dims(model, tied)
    gated = cfg.model.gated_mlp
    stored = set(_megatron(_checkpointing().load_tensors_metadata, directory))

    def source(name: str) -> str:  # the last stage's tied output layer reads the embedding
        return "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name

    # (checkpoint key, local tensor to fill, its stored view and offsets)
    wanted: list[tuple[str, torch.Tensor, tuple]] = []
    targets = []
    for chunk in chunks_of(model):
        local_state = chunk.state_dict(keep_vars=True)
        for (local, tensor), name in zip(local_state.items(), global_names(chunk, local_state)):
            if not isinstance(tensor, torch.Tensor):
                continue  # `_extra_state`: kept as built
            key = source(name)
            template = torch.empty_like(tensor.detach())
            wanted.append((key, template, _sharding(key, template, dims, gated, layout)))
            targets.append((chunk, local))
    optim_targets = []
    if optimizer is not None:
        for param, name in param_names(model).items():
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

    # Every rank raises (a rank that went on would wait in megatron's collectives for the others).
    missing = sorted({k for held in _everyone([k for k, _, _ in wanted[:len(targets)] if k not in stored])
                      for k in held})
    if missing:
        raise CheckpointError(f"{directory}: the model's {missing[:5]} are not in the checkpoint")
    tensors = _sharded_tensors([(k, view, offsets) for k, _, (view, offsets) in wanted])
    request = {f"{i}": tensor for i, tensor in enumerate(tensors)}
    loaded = _megatron(_checkpointing().load, directory, request)  # (unlike save, no CUDA on its path)
    values = [loaded[f"{i}"].reshape(template.shape) for i, (_, template, _) in enumerate(wanted)]

    per_chunk: dict[int, dict] = {}
    for (chunk, local), value in zip(targets, values[:len(targets)]):
        per_chunk.setdefault(id(chunk), {})[local] = value
    for chunk in chunks_of(model):
        load_weights(chunk, per_chunk.get(id(chunk), {}), str(directory))
    adam: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for (param, entry), value in zip(optim_targets, values[len(targets):]):
        adam.setdefault(param, {})[entry] = value.reshape(()) if entry == "step" else value
    if optimizer is not None:
        load_adam_state(optimizer, adam)


def load_merged(directory: Path, dims: dict[str, int | None],
                optimizer: bool = False) -> dict[str, torch.Tensor]:
    """The one-process model's state dict, read whole from any layout (or, with `optimizer`, Adam's
    state as `optimizer.<name>.<exp_avg|exp_avg_sq|step>`); `dims` are the saved model's partition
    dims (to unfold gated fc1 tensors). Collective where a process group is initialized."""
    ckpt = _checkpointing()
    gated = verify_dist_dir(directory)["gated_mlp"]
    metadata = _megatron(ckpt.load_tensors_metadata, directory)
    keys = sorted(k for k in metadata if k.startswith(OPTIM_PREFIX) == optimizer)
    own_group = not dist.is_initialized()  # megatron's load gathers metadata over a group
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tensors = _sharded_tensors([(k, torch.empty(metadata[k].global_shape, dtype=metadata[k].dtype), [])
                                    for k in keys])
        loaded = _megatron(ckpt.load, directory, dict(zip(keys, tensors)))  # and the common entries
        out = {k: loaded[k] for k in keys}
    finally:
        if own_group:
            dist.destroy_process_group()
    for key, value in out.items():
        name, entry = key[len(OPTIM_PREFIX):].rsplit(".", 1) if optimizer else (key, None)
        dim = dims.get(name)
        if gated and dim is not None and "linear_fc1" in name and entry != "step":
            out[key] = value.flatten(dim, dim + 1)
    return out
