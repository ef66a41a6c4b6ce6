"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

    <save_dir>/latest                 name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step_00000100/
        config.yaml                   the resolved config of the run
        meta.json                     step, parallel layout, vocab sizes, TP partition dims
        model_tp00.pt ...             weights of each tensor-parallel rank (model_tp00_pp01.pt ...
                                      with pipeline stages), under the whole model's names (global
                                      layer numbers), without the experts when they are split over
                                      expert-parallel ranks
        experts_ep00.pt ...           with expert parallelism: each expert-parallel rank's experts
        optim_tp00.pt ...             Adam state, split and named like the weights
        optim_experts_ep00.pt ...     (and like the experts)
        rng_rank000.pt ...            RNG states of every process
        tokenizer.model               the SentencePiece model the run trained with

Loading merges the parts into the one-process state and takes the loading rank's slice, so a
checkpoint saved at one layout (tensor x pipeline x expert x data) loads at any other, with its
optimizer state. (This costs one whole copy of the model and its Adam state per process while
loading.) With `train.checkpoint_format: megatron` the model and optimizer files are replaced by
`dist/`, megatron-core's distributed checkpoint, from which each rank reads only its slice
(megalong/train/dist_checkpoint.py); meta.json's "format" says which a checkpoint holds.

A process killed while saving leaves only `.step_XXXX.tmp`, never a half-written `step_XXXX`,
and `latest` keeps naming the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megalong.config import Config, ConfigError, config_from_dict
from megalong.model.tp_shard import merge_tensor_parallel, partition_dims, split_tensor_parallel
from megalong.parallel.distributed import ParallelLayout

LATEST = "latest"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from another configuration."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _chunks(model) -> list[torch.nn.Module]:
    """A rank's model chunks: one module, or the list of its virtual pipeline stages."""
    if isinstance(model, (list, tuple, torch.nn.ModuleList)):
        return list(model)
    return [model]


def _global_state(model, tied: bool) -> dict[str, torch.Tensor]:
    """This rank's weights under the whole model's names (global layer numbers). The last
    stage's copy of tied embeddings is left out: the one-process model has no such entry."""
    from megalong.model.gpt import layer_offset, to_global_names

    state: dict[str, torch.Tensor] = {}
    for chunk in _chunks(model):
        offset = layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0
        state.update(to_global_names(chunk.state_dict(), offset))
    if tied and "embedding.word_embeddings.weight" not in state:
        state.pop("output_layer.weight", None)
    return state


def _param_names(model) -> dict[torch.nn.Parameter, str]:
    from megalong.model.gpt import layer_offset, _shift_layer

    names = {}
    for chunk in _chunks(model):
        offset = layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0
        for name, param in chunk.named_parameters():
            names.setdefault(param, _shift_layer(name, offset))
    return names


OPTIM_SEP = "/"  # optimizer entries are named "<parameter name>/<state key>"


def _optimizer_state(model, optimizer: torch.optim.Optimizer, tied: bool) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state under the parameters' global names, so that it can be merged
    and re-split for another layout like the weights."""
    from megalong.train.megatron_dp import adam_state

    whole = adam_state(optimizer)  # gathered from the shards of megatron's distributed optimizer
    state = {}
    for param, name in _param_names(model).items():
        if tied and name == "output_layer.weight":
            continue  # the same state as the first stage's embedding
        for key, value in whole.get(param, {}).items():
            state[f"{name}{OPTIM_SEP}{key}"] = value
    return state


def _set_optimizer_state(model, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    from megalong.train.megatron_dp import load_adam_state

    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, entry = key.rsplit(OPTIM_SEP, 1)
        by_name.setdefault(name, {})[entry] = value
    by_param = {}
    for param, name in _param_names(model).items():
        if name == "output_layer.weight" and name not in by_name:
            name = "embedding.word_embeddings.weight"  # tied: the last stage's copy
        if name in by_name:
            by_param[param] = by_name[name]
    load_adam_state(optimizer, by_param)


def _part_suffix(tp: int, pp: int, pipeline: int) -> str:
    return f"tp{tp:02d}" + (f"_pp{pp:02d}" if pipeline > 1 else "")


def save_checkpoint(save_dir: str | Path, step: int, cfg: Config, model,
                    optimizer: torch.optim.Optimizer, layout: ParallelLayout,
                    tokenizer_path: str, tokenizer_vocab_size: int) -> Path:
    """Save on every rank (collective); returns the final directory. `model` is a module or a
    pipeline rank's list of model chunks."""
    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f".{final.name}.tmp"
    if layout.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    tp, pp, ep = layout.tensor_rank, layout.pipeline_rank, layout.expert_rank
    split_experts = layout.expert_parallel > 1
    tied = cfg.model.tie_embeddings
    part = _part_suffix(tp, pp, layout.pipeline_parallel)
    expert_part = f"ep{ep:02d}" + (f"_pp{pp:02d}" if layout.pipeline_parallel > 1 else "")
    state = _global_state(model, tied)
    optim = _optimizer_state(model, optimizer, tied)
    megatron_format = cfg.train.checkpoint_format == "megatron"

    def dense(entries):
        return {k: v for k, v in entries.items() if not (split_experts and is_expert_key(k))}

    def experts(entries):
        return {k: v for k, v in entries.items() if is_expert_key(k)}

    if megatron_format:  # megatron-core's dist_checkpointing (megalong/train/dist_checkpoint.py)
        from megalong.train.dist_checkpoint import DIST_DIR, save_distributed

        save_distributed(tmp / DIST_DIR, cfg, model, optimizer, layout, step)
    # Otherwise every part is written once, by the first process that holds it.
    elif _first_holder(("model", tp, pp)):
        torch.save(dense(state), tmp / f"model_{part}.pt")
        torch.save({"state": dense(optim), "groups": _groups(optimizer)}, tmp / f"optim_{part}.pt")
    if not megatron_format and split_experts and _first_holder(("experts", ep, pp)):
        torch.save(experts(state), tmp / f"experts_{expert_part}.pt")
        torch.save({"state": experts(optim)}, tmp / f"optim_experts_{expert_part}.pt")
    torch.save(_rng_state(), tmp / f"rng_rank{layout.rank:03d}.pt")
    dims = _gathered(partition_dims_global(model))
    _barrier()

    if layout.rank == 0:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        meta = {
            "step": step,
            "format": cfg.train.checkpoint_format,
            "tensor_parallel": layout.tensor_parallel,
            "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel,
            "expert_parallel": layout.expert_parallel,
            "world_size": layout.world_size,
            "tokenizer_vocab_size": tokenizer_vocab_size,
            "gated_mlp": cfg.model.activation == "swiglu",
            "partition_dims": dims,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomically(save_dir / LATEST, final.name + "\n")
    _barrier()
    return final


def partition_dims_global(model) -> dict[str, int | None]:
    """partition_dims of every chunk, under global layer names."""
    from megalong.model.gpt import layer_offset, to_global_names

    dims = {}
    for chunk in _chunks(model):
        offset = layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0
        dims.update(to_global_names(partition_dims(chunk), offset))
    return dims


def _gathered(dims: dict) -> dict:
    """The union of every rank's dict (each pipeline stage knows only its own layers)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dims
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dims)
    out = {}
    for part in parts:
        out.update(part)
    return out


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def is_expert_key(name: str) -> bool:
    """State-dict keys of expert weights (split over expert-parallel ranks along dim 0)."""
    return ".mlp.experts.w" in name


def _first_holder(key: tuple) -> bool:
    """Whether this process is the lowest rank holding `key` (all ranks call this together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    return keys.index(key) == dist.get_rank()


def _load(path: Path, device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def find_latest(save_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under save_dir, or None."""
    save_dir = Path(save_dir)
    pointer = save_dir / LATEST
    if pointer.is_file():
        candidate = save_dir / pointer.read_text().strip()
        if (candidate / META).is_file():
            return candidate
    complete = sorted(p for p in save_dir.glob("step_*") if (p / META).is_file())
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a save_dir whose newest complete checkpoint is taken."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = find_latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path} (expected {META} in a step_* directory)")
    return found


@dataclass
class CheckpointInfo:
    path: Path
    config: Config
    meta: dict


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    path = resolve_checkpoint(path)
    raw = yaml.safe_load((path / "config.yaml").read_text())
    return CheckpointInfo(path=path, config=config_from_dict(raw), meta=json.loads((path / META).read_text()))


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Refuse a checkpoint whose model differs from the current config (any parallel layout loads)."""
    saved_model, current_model = saved.to_dict()["model"], current.to_dict()["model"]
    differing = [k for k in current_model if saved_model.get(k) != current_model[k]]
    if differing:
        details = "; ".join(f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current_model[k]!r}"
                            for k in differing)
        raise CheckpointError(f"checkpoint {path} was trained with another model config: {details}")


def _merged(info: CheckpointInfo, prefix: str, device="cpu") -> dict[str, torch.Tensor]:
    """Entries of the `model` (weights) or `optim` (Adam state) files merged into what one process
    holds: TP shards concatenated along their split dimension, experts over EP ranks along dim 0,
    and the pipeline stages' (globally named) entries united."""
    meta = info.meta
    tp, pp, ep = meta["tensor_parallel"], meta.get("pipeline_parallel", 1), meta.get("expert_parallel", 1)
    dims = dict(meta["partition_dims"])
    if prefix == "optim":
        dims = {f"{n}{OPTIM_SEP}{k}": d for n, d in dims.items() for k in ("exp_avg", "exp_avg_sq")}

    def read(name: str) -> dict:
        data = _load(info.path / name, device)
        return data["state"] if prefix == "optim" else data

    merged: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        shards = [read(f"{prefix}_{_part_suffix(t, stage, pp)}.pt") for t in range(tp)]
        if ep > 1:  # experts are whole on every TP rank and split over EP ranks along dim 0
            stage_tag = f"_pp{stage:02d}" if pp > 1 else ""
            name = "experts" if prefix == "model" else "optim_experts"
            per_rank = [read(f"{name}_ep{e:02d}{stage_tag}.pt") for e in range(ep)]
            experts = {k: (torch.cat([part[k] for part in per_rank], dim=0) if per_rank[0][k].ndim
                           else per_rank[0][k]) for k in per_rank[0]}
            for shard in shards:
                shard.update(experts)
        merged.update(merge_tensor_parallel(shards, dims, meta["gated_mlp"]))
    return merged


def _this_rank(full: dict[str, torch.Tensor], dims: dict, cfg: Config, layout: ParallelLayout,
               wanted: set[str]) -> dict[str, torch.Tensor]:
    """This rank's slice of a merged state: its TP slice, its experts."""
    out = split_tensor_parallel({k: v for k, v in full.items() if k in wanted}, dims,
                                layout.tensor_parallel, layout.tensor_rank, cfg.model.activation == "swiglu")
    if layout.expert_parallel > 1:
        for k, v in out.items():
            if is_expert_key(k) and v.ndim:
                out[k] = v.chunk(layout.expert_parallel, dim=0)[layout.expert_rank].clone()
    return out


def load_checkpoint(path: str | Path, cfg: Config, model, optimizer: Optional[torch.optim.Optimizer],
                    layout: ParallelLayout) -> int:
    """Restore model, optimizer and RNG state in place; returns the step to continue from.

    The checkpoint may come from any tensor/pipeline/expert/data-parallel layout: it is merged to
    the one-process state and this rank's part is taken (weights and Adam state alike)."""
    from megalong.model.gpt import layer_offset, to_global_names

    info = read_checkpoint_info(path)
    check_compatible(info.config, cfg, info.path)
    dims = partition_dims_global(model)
    tied = cfg.model.tie_embeddings
    if tied and "output_layer.weight" in dims:  # the last stage's copy is split like the original
        dims.setdefault("embedding.word_embeddings.weight", dims["output_layer.weight"])
    if info.meta.get("format") == "megatron":
        from megalong.train.dist_checkpoint import DIST_DIR, load_distributed

        load_distributed(info.path / DIST_DIR, cfg, model, optimizer, layout)
        _load_rng(info, layout)
        return int(info.meta["step"])
    full = _merged(info, "model", layout.device)
    for chunk in _chunks(model):
        offset = layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0
        local_to_global = {k: g for k, g in zip(chunk.state_dict(),
                                                to_global_names(dict.fromkeys(chunk.state_dict()), offset))}
        sources = {g if not (tied and g == "output_layer.weight" and g not in full)
                   else "embedding.word_embeddings.weight" for g in local_to_global.values()}
        mine = _this_rank(full, dims, cfg, layout, sources)
        state = {}
        for local, g in local_to_global.items():
            if tied and g == "output_layer.weight" and g not in full:
                g = "embedding.word_embeddings.weight"
            state[local] = mine[g]
        chunk.load_state_dict(state, strict=True)
    if optimizer is not None:
        full_optim = _merged(info, "optim", layout.device)
        optim_dims = {f"{n}{OPTIM_SEP}{k}": d for n, d in dims.items() for k in ("exp_avg", "exp_avg_sq")}
        names = set(_param_names(model).values()) | {"embedding.word_embeddings.weight"}
        wanted = {k for k in full_optim if k.rsplit(OPTIM_SEP, 1)[0] in names}
        _set_optimizer_state(model, optimizer, _this_rank(full_optim, optim_dims, cfg, layout, wanted))
    _load_rng(info, layout)
    return int(info.meta["step"])


def _load_rng(info: CheckpointInfo, layout: ParallelLayout) -> None:
    rng_file = info.path / f"rng_rank{layout.rank:03d}.pt"
    if rng_file.is_file() and info.meta["world_size"] == layout.world_size:
        _set_rng_state(torch.load(rng_file, weights_only=False))


def load_merged_state(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The model's state dict as a single one-process model would hold it, from any layout."""
    info = read_checkpoint_info(path)
    if info.meta.get("format") == "megatron":
        from megalong.train.dist_checkpoint import DIST_DIR, load_merged

        return info, load_merged(info.path / DIST_DIR, info.meta["partition_dims"])
    return info, _merged(info, "model")


def single_process_config(cfg: Config) -> Config:
    """The same config for a single process (used to rebuild a merged model for export/sampling)."""
    raw = cfg.to_dict()
    raw["parallel"].update({"tensor": 1, "expert": 1, "pipeline": 1, "virtual_stages": 1,
                            "pipeline_layers": None})
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # pragma: no cover - a saved config was validated when it was saved
        raise CheckpointError(str(e)) from None
