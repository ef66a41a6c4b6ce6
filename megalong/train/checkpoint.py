"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.
No file of a checkpoint is a pickle: loading one never runs code.

    <save_dir>/latest                     name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step_00000100/
        config.yaml                       the resolved config of the run
        meta.json                         format_version, step, parallel layout, vocab sizes, TP
                                          partition dims, the optimizer's param-group
                                          hyper-parameters; written last: marks completeness
        model_tp00.safetensors ...        weights of each tensor-parallel rank (model_tp00_pp01...
                                          with pipeline stages), under the whole model's names
                                          (global layer numbers), without the experts when they
                                          are split over expert-parallel ranks
        experts_ep00.safetensors ...      with expert parallelism: each expert-parallel rank's experts
        optim_tp00.safetensors ...        Adam's exp_avg, exp_avg_sq and step per parameter
                                          ("<name>/exp_avg"), split and named like the weights
        optim_experts_ep00.safetensors    (and like the experts)
        rng_rank000.safetensors ...       every process's RNG states: torch's (and CUDA's) as uint8
                                          tensors, Python's and numpy's as JSON in its metadata
        tokenizer.model                   the SentencePiece model the run trained with

The data position and the learning-rate schedule follow from the step. Loading merges the parts
into the one-process state and takes the loading rank's slice, so a checkpoint saved at one layout
(tensor x pipeline x expert x data) loads at any other, with its optimizer state (this costs one
whole copy of the model and its Adam state per process while loading). With
`train.checkpoint_format: megatron` the model and optimizer files are replaced by `dist/`,
megatron-core's distributed checkpoint, from which each rank reads only its slice
(megalong/train/dist_checkpoint.py; its pickled files are read through
megalong/train/library_loads.py); meta.json's "format" says which a checkpoint holds.

A process killed while saving leaves only `.step_XXXX.tmp`, never a half-written `step_XXXX`,
and `latest` keeps naming the previous complete checkpoint. Checkpoints of the old pickled .pt
format are refused with the command that converts them (megalong/train/convert.py).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from megalong.config import Config, ConfigError, architecture_differences, config_from_dict
from megalong.model.tp_shard import merge_tensor_parallel
from megalong.parallel.distributed import ParallelLayout
from megalong.train.checkpoint_files import (  # noqa: F401  (CheckpointError: the public name)
    CONFIG, FORMAT_VERSION, META, TOKENIZER, CheckpointError, json_safe_groups, load_rng, read_config,
    read_meta, read_tensors, save_rng, write_tensors, write_text_atomically)
from megalong.train.model_state import (  # noqa: F401  (is_expert_key, partition_dims_global: public)
    OUTPUT_LAYER, TIED_EMBEDDING, chunks_of, first_holder, gathered, global_state, global_names,
    is_expert_key, load_weights, loading_dims, optimizer_dims, optimizer_state, param_names,
    partition_dims_global, rank_slice, set_optimizer_state)
from megalong.train.save_dir import (  # noqa: F401  (re-exported: the checkpoint API)
    LATEST, find_latest, prepare_save_dir, remove_old_checkpoints, resolve_checkpoint, resume_path,
    step_dir_name)
from megalong.train import save_dir as save_dirs


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _part_suffix(tp: int, pp: int, pipeline: int) -> str:
    return f"tp{tp:02d}" + (f"_pp{pp:02d}" if pipeline > 1 else "")


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank{rank:03d}.safetensors"


def begin_checkpoint(save_dir: Path, step: int, rank: int) -> tuple[Path, Path]:
    """(temporary directory to write into, final directory); collective."""
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f".{final.name}.tmp"
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    return tmp, final


def finish_checkpoint(tmp: Path, final: Path, cfg: Config, tokenizer_path: str, meta: dict,
                      resumed_from: Optional[Path]) -> None:
    """Rank 0, after every rank wrote its files: config, tokenizer, meta.json (last), the rename,
    `latest`, and `train.keep_last`'s cleanup."""
    (tmp / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    (tmp / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    if final.exists():  # a run resumed from an earlier step writes this step again
        save_dirs.remove_checkpoint(final)
    tmp.rename(final)
    write_text_atomically(final.parent / LATEST, final.name + "\n")
    if cfg.train.keep_last:
        remove_old_checkpoints(final.parent, cfg.train.keep_last, final, resumed_from)


def save_checkpoint(save_dir: str | Path, step: int, cfg: Config, model,
                    optimizer: torch.optim.Optimizer, layout: ParallelLayout,
                    tokenizer_path: str, tokenizer_vocab_size: int,
                    resumed_from: Optional[Path] = None) -> Path:
    """Save on every rank (collective); returns the final directory. `model` is a module or a
    pipeline rank's list of model chunks; `resumed_from` is never deleted by `train.keep_last`."""
    tmp, final = begin_checkpoint(Path(save_dir), step, layout.rank)
    tp, pp, ep = layout.tensor_rank, layout.pipeline_rank, layout.expert_rank
    split_experts = layout.expert_parallel > 1
    tied = cfg.model.tie_embeddings
    part = _part_suffix(tp, pp, layout.pipeline_parallel)
    expert_part = f"ep{ep:02d}" + (f"_pp{pp:02d}" if layout.pipeline_parallel > 1 else "")
    state = global_state(model, tied)
    optim = optimizer_state(model, optimizer, tied)
    megatron_format = cfg.train.checkpoint_format == "megatron"

    def dense(entries):
        return {k: v for k, v in entries.items() if not (split_experts and is_expert_key(k))}

    def experts(entries):
        return {k: v for k, v in entries.items() if is_expert_key(k)}

    if megatron_format:  # megatron-core's dist_checkpointing (megalong/train/dist_checkpoint.py)
        from megalong.train.dist_checkpoint import DIST_DIR, save_distributed

        save_distributed(tmp / DIST_DIR, cfg, model, optimizer, layout, step)
    # Otherwise every part is written once, by the first process that holds it.
    elif first_holder(("model", tp, pp)):
        write_tensors(tmp / f"model_{part}.safetensors", dense(state))
        write_tensors(tmp / f"optim_{part}.safetensors", dense(optim))
    if not megatron_format and split_experts and first_holder(("experts", ep, pp)):
        write_tensors(tmp / f"experts_{expert_part}.safetensors", experts(state))
        write_tensors(tmp / f"optim_experts_{expert_part}.safetensors", experts(optim))
    save_rng(rng_file(tmp, layout.rank))
    dims = gathered(partition_dims_global(model))
    _barrier()

    if layout.rank == 0:
        meta = {
            "step": step,
            "format": cfg.train.checkpoint_format,
            "tensor_parallel": layout.tensor_parallel,
            "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel,
            "expert_parallel": layout.expert_parallel,
            "world_size": layout.world_size,
            "tokenizer_vocab_size": tokenizer_vocab_size,
            "gated_mlp": cfg.model.gated_mlp,
            "partition_dims": dims,
            "optimizer_param_groups": json_safe_groups(optimizer.param_groups),
        }
        finish_checkpoint(tmp, final, cfg, tokenizer_path, meta, resumed_from)
    _barrier()
    return final


@dataclass
class CheckpointInfo:
    path: Path
    config: Config
    meta: dict


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The step directory `path` names (or the newest in a save_dir), its meta.json and config,
    both checked."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    return CheckpointInfo(path=path, config=read_config(path), meta=meta)


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Refuse a checkpoint whose architecture (model section) differs from the current config's;
    any parallel layout and any execution, train or data settings load."""
    differing = architecture_differences(saved, current)
    if differing:
        details = "; ".join(differing)
        raise CheckpointError(f"checkpoint {path} was trained with another model config: {details}")


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
            shards = [read_tensors(info.path / f"{prefix}_{_part_suffix(t, stage, pp)}.safetensors", device)
                      for t in range(tp)]
            if ep > 1:  # experts are whole on every TP rank and split over EP ranks along dim 0
                stage_tag = f"_pp{stage:02d}" if pp > 1 else ""
                name = "experts" if prefix == "model" else "optim_experts"
                per_rank = [read_tensors(info.path / f"{name}_ep{e:02d}{stage_tag}.safetensors", device)
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


def _missing(full: dict, wanted: set[str], path: Path) -> None:
    absent = sorted(wanted - full.keys())
    if absent:
        raise CheckpointError(f"{path}: the model's {absent[:5]} are not in the checkpoint")


def load_checkpoint(path: str | Path, cfg: Config, model, optimizer: Optional[torch.optim.Optimizer],
                    layout: ParallelLayout) -> int:
    """Restore model, optimizer and RNG state in place; returns the step to continue from.

    The checkpoint may come from any tensor/pipeline/expert/data-parallel layout: it is merged to
    the one-process state and this rank's part is taken (weights and Adam state alike)."""
    info = read_checkpoint_info(path)
    check_compatible(info.config, cfg, info.path)
    if info.meta.get("engine") == "deepspeed":
        raise CheckpointError(f"checkpoint {info.path} was written by the DeepSpeed engine; resume it "
                              "with train.engine: deepspeed (or export it)")
    tied = cfg.model.tie_embeddings
    dims = loading_dims(model, tied)
    if info.meta.get("format") == "megatron":
        from megalong.train.dist_checkpoint import DIST_DIR, load_distributed

        load_distributed(info.path / DIST_DIR, cfg, model, optimizer, layout)
        restore_rng(info, layout)
        return int(info.meta["step"])
    full = merged_state(info, "model", layout.device)
    for chunk in chunks_of(model):
        local_names = list(chunk.state_dict())
        sources = {}
        for local, name in zip(local_names, global_names(chunk, local_names)):
            if tied and name == OUTPUT_LAYER and name not in full:
                name = TIED_EMBEDDING  # the last stage's copy of the tied embedding
            if not local.endswith("_extra_state"):
                sources[local] = name
        _missing(full, set(sources.values()), info.path)
        mine = rank_slice(full, dims, cfg, layout, set(sources.values()))
        load_weights(chunk, {local: mine[name] for local, name in sources.items()}, str(info.path))
    if optimizer is not None:
        full_optim = merged_state(info, "optim", layout.device)
        names = set(param_names(model).values()) | {TIED_EMBEDDING}
        wanted = {k for k in full_optim if k.rsplit("/", 1)[0] in names}
        set_optimizer_state(model, optimizer, rank_slice(full_optim, optimizer_dims(dims), cfg, layout, wanted))
    restore_rng(info, layout)
    return int(info.meta["step"])


def restore_rng(info: CheckpointInfo, layout: ParallelLayout) -> None:
    """Every process's RNG states, when the checkpoint has as many processes (else they stay as
    seeded: a run at another layout cannot repeat the same random numbers anyway)."""
    if info.meta["world_size"] == layout.world_size:
        load_rng(rng_file(info.path, layout.rank))


def load_merged_state(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The model's state dict as a single one-process model would hold it, from any layout."""
    info = read_checkpoint_info(path)
    return info, whole_model_state(info)


def whole_model_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The one-process model's weights, each parameter meta.json names present."""
    if info.meta.get("format") == "megatron":
        from megalong.train.dist_checkpoint import DIST_DIR, load_merged

        state = load_merged(info.path / DIST_DIR, info.meta["partition_dims"])
    else:
        state = merged_state(info, "model")
    expected = set(info.meta["partition_dims"]) - ({OUTPUT_LAYER} if info.config.model.tie_embeddings else set())
    _missing(state, expected, info.path)
    return state


def single_process_config(cfg: Config) -> Config:
    """The same config for a single process (used to rebuild a merged model for export/sampling)."""
    raw = cfg.to_dict()
    raw["parallel"].update({"tensor": 1, "expert": 1, "pipeline": 1, "virtual_stages": 1,
                            "pipeline_layers": None})
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # pragma: no cover - a saved config was validated when it was saved
        raise CheckpointError(str(e)) from None
