"""megalong's own checkpoint format (`train.checkpoint_format: megalong`): safetensors files of
weights and Adam state per tensor-parallel rank (and pipeline stage, and expert-parallel rank),
under the whole model's names; loading merges them to the one-process state and takes the
loading rank's slice, so any layout loads at any other (megalong/checkpoint/__init__.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megalong.checkpoint.files import json_safe_groups, read_tensors, write_tensors
from megalong.checkpoint.format import TrainState
from megalong.checkpoint.model_state import (global_state, loading_dims, load_weights, optimizer_dims,
                                             optimizer_state, param_names, partition_dims_global, rank_slice,
                                             set_optimizer_state)
from megalong.checkpoint.names import OPTIM_SEP, TIED_EMBEDDING, chunks_of, global_names, is_expert_key, tied_source
from megalong.checkpoint.ranks import first_holder, union_over_ranks
from megalong.checkpoint.step import CheckpointInfo, missing_entries
from megalong.config import Config
from megalong.errors import CheckpointError
from megalong.model.tp_shard import merge_tensor_parallel
from megalong.parallel.distributed import ParallelLayout


def part_suffix(tp: int, pp: int, pipeline: int) -> str:
    """`tp00` (`tp00_pp01` with pipeline stages): the part of the model a `model_*` file holds."""
    return f"tp{tp:02d}" + (f"_pp{pp:02d}" if pipeline > 1 else "")


def expert_suffix(ep: int, pp: int, pipeline: int) -> str:
    return f"ep{ep:02d}" + (f"_pp{pp:02d}" if pipeline > 1 else "")


def write_model_files(step_dir: Path, weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor] | None,
                      layout: ParallelLayout) -> None:
    """This rank's weights (and Adam state) in the files of its part; every part is written once,
    by the first process that holds it (collective)."""
    tp, pp, ep = layout.tensor_rank, layout.pipeline_rank, layout.expert_rank
    split_experts = layout.expert_parallel > 1

    def dense(entries: dict) -> dict:
        return {k: v for k, v in entries.items() if not (split_experts and is_expert_key(k))}

    def experts(entries: dict) -> dict:
        return {k: v for k, v in entries.items() if is_expert_key(k)}

    part = part_suffix(tp, pp, layout.pipeline_parallel)
    if first_holder(("model", tp, pp)):
        write_tensors(step_dir / f"model_{part}.safetensors", dense(weights))
        if optim is not None:
            write_tensors(step_dir / f"optim_{part}.safetensors", dense(optim))
    if split_experts and first_holder(("experts", ep, pp)):
        expert_part = expert_suffix(ep, pp, layout.pipeline_parallel)
        write_tensors(step_dir / f"experts_{expert_part}.safetensors", experts(weights))
        if optim is not None:
            write_tensors(step_dir / f"optim_experts_{expert_part}.safetensors", experts(optim))


def merged_state(info: CheckpointInfo, prefix: str = "model", device="cpu") -> dict[str, torch.Tensor]:
    """Entries of the `model` (weights) or `optim` (Adam state) files merged into what one process
    holds: TP shards concatenated along their split dimension, experts over EP ranks along dim 0,
    and the pipeline stages' (globally named) entries united."""
    meta = info.meta
    tp, pp, ep = meta["tensor_parallel"], meta["pipeline_parallel"], meta["expert_parallel"]
    dims = dict(meta["partition_dims"])
    if prefix == "optim":
        dims = optimizer_dims(dims)

    merged: dict[str, torch.Tensor] = {}
    try:
        for stage in range(pp):
            shards = [read_tensors(info.path / f"{prefix}_{part_suffix(t, stage, pp)}.safetensors", device)
                      for t in range(tp)]
            if ep > 1:  # experts are whole on every TP rank and split over EP ranks along dim 0
                name = "experts" if prefix == "model" else "optim_experts"
                per_rank = [read_tensors(info.path / f"{name}_{expert_suffix(e, stage, pp)}.safetensors", device)
                            for e in range(ep)]
                experts = {k: (torch.cat([part[k] for part in per_rank], dim=0) if per_rank[0][k].ndim
                               else per_rank[0][k]) for k in per_rank[0]}
                for shard in shards:
                    shard.update(experts)
            merged.update(merge_tensor_parallel(shards, dims, meta["gated_mlp"]))
    except (KeyError, RuntimeError, IndexError) as e:  # parts that do not fit together
        raise CheckpointError(f"{info.path}: its {prefix} files do not fit together "
                              f"({type(e).__name__}: {e})") from None
    return merged


def load_model_files(info: CheckpointInfo, cfg: Config, model: Any, layout: ParallelLayout) -> dict:
    """This rank's slice of the merged weights into `model` (a module or a list of chunks);
    returns the partition dims it loaded with."""
    return load_whole_model(merged_state(info, "model", layout.device), info, cfg, model, layout)


def load_whole_model(full: dict[str, torch.Tensor], info: CheckpointInfo, cfg: Config, model: Any,
                     layout: ParallelLayout) -> dict:
    """This rank's slice of `full` (the one-process model's weights) into `model`; returns the
    partition dims it loaded with."""
    tied = cfg.model.tie_embeddings
    dims = loading_dims(model, tied)
    for chunk in chunks_of(model):
        local_names = list(chunk.state_dict())
        sources = {}
        for local, name in zip(local_names, global_names(chunk, local_names)):
            if name not in full:
                name = tied_source(name, tied)
            if not local.endswith("_extra_state"):
                sources[local] = name
        missing_entries(full, set(sources.values()), info.path)
        mine = rank_slice(full, dims, cfg, layout, set(sources.values()))
        load_weights(chunk, {local: mine[name] for local, name in sources.items()}, str(info.path))
    return dims


class NativeFormat:
    name = "megalong"

    def save(self, step_dir: Path, step: int, cfg: Config, state: TrainState, layout: ParallelLayout) -> dict[str, Any]:
        tied = cfg.model.tie_embeddings
        write_model_files(step_dir, global_state(state.chunks, tied), optimizer_state(state, tied), layout)
        return {"format": self.name, "partition_dims": union_over_ranks(partition_dims_global(state.chunks)),
                "optimizer_param_groups": json_safe_groups(state.param_groups())}

    def load(self, info: CheckpointInfo, cfg: Config, state: TrainState, layout: ParallelLayout) -> None:
        dims = load_model_files(info, cfg, state.chunks, layout)
        full_optim = merged_state(info, "optim", layout.device)
        names = set(param_names(state.chunks).values()) | {TIED_EMBEDDING}
        wanted = {k for k in full_optim if k.rsplit(OPTIM_SEP, 1)[0] in names}
        set_optimizer_state(state, rank_slice(full_optim, optimizer_dims(dims), cfg, layout, wanted))

    def whole_model(self, info: CheckpointInfo) -> dict[str, torch.Tensor]:
        return merged_state(info, "model")
