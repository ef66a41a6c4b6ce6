"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

    <save_dir>/latest                 name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step_00000100/
        config.yaml                   the resolved config of the run
        meta.json                     step, parallel layout, vocab sizes, TP partition dims
        model_tp00.pt ...             model state of each tensor-parallel rank (without the experts
                                      when they are split over expert-parallel ranks)
        experts_ep00.pt ...           with expert parallelism: each expert-parallel rank's experts
        optim_tp00.pt ...             optimizer state of each tensor-parallel rank
                                      (optim_tp00_ep00.pt ... with expert parallelism)
        rng_rank000.pt ...            RNG states of every process
        tokenizer.model               the SentencePiece model the run trained with

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
from megalong.model.tp_shard import merge_tensor_parallel, partition_dims
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


def save_checkpoint(save_dir: str | Path, step: int, cfg: Config, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, layout: ParallelLayout,
                    tokenizer_path: str, tokenizer_vocab_size: int) -> Path:
    """Save on every rank (collective); returns the final directory."""
    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f".{final.name}.tmp"
    if layout.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    tp, ep, split_experts = layout.tensor_rank, layout.expert_rank, layout.expert_parallel > 1
    state = model.state_dict()
    # Every part is written once, by the first process that holds it.
    if _first_holder(("model", tp)):
        torch.save({k: v for k, v in state.items() if not (split_experts and is_expert_key(k))},
                   tmp / f"model_tp{tp:02d}.pt")
    if split_experts and _first_holder(("experts", ep)):
        torch.save({k: v for k, v in state.items() if is_expert_key(k)}, tmp / f"experts_ep{ep:02d}.pt")
    if _first_holder(("optim", tp, ep)):
        torch.save(optimizer.state_dict(), tmp / _optim_name(tp, ep, split_experts))
    torch.save(_rng_state(), tmp / f"rng_rank{layout.rank:03d}.pt")
    _barrier()

    if layout.rank == 0:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        meta = {
            "step": step,
            "tensor_parallel": layout.tensor_parallel,
            "data_parallel": layout.data_parallel,
            "expert_parallel": layout.expert_parallel,
            "world_size": layout.world_size,
            "tokenizer_vocab_size": tokenizer_vocab_size,
            "gated_mlp": cfg.model.activation == "swiglu",
            "partition_dims": partition_dims(model),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomically(save_dir / LATEST, final.name + "\n")
    _barrier()
    return final


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


def _optim_name(tp: int, ep: int, split_experts: bool) -> str:
    return f"optim_tp{tp:02d}_ep{ep:02d}.pt" if split_experts else f"optim_tp{tp:02d}.pt"


def _load(path: Path, device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def _model_state(path: Path, tp: int, ep: int, expert_parallel: int, device) -> dict[str, torch.Tensor]:
    state = _load(path / f"model_tp{tp:02d}.pt", device)
    if expert_parallel > 1:
        state.update(_load(path / f"experts_ep{ep:02d}.pt", device))
    return state


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
    """Refuse a checkpoint whose model (or TP layout) differs from the current config."""
    saved_model, current_model = saved.to_dict()["model"], current.to_dict()["model"]
    differing = [k for k in current_model if saved_model.get(k) != current_model[k]]
    if differing:
        details = "; ".join(f"model.{k}: checkpoint {saved_model.get(k)!r}, config {current_model[k]!r}"
                            for k in differing)
        raise CheckpointError(f"checkpoint {path} was trained with another model config: {details}")
    for key in ("tensor", "expert"):
        if getattr(saved.parallel, key) != getattr(current.parallel, key):
            raise CheckpointError(
                f"checkpoint {path} has parallel.{key}={getattr(saved.parallel, key)} but the config "
                f"asks for {getattr(current.parallel, key)}; keep the same layout to resume")


def load_checkpoint(path: str | Path, cfg: Config, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], layout: ParallelLayout) -> int:
    """Restore model, optimizer and RNG state in place; returns the step to continue from."""
    info = read_checkpoint_info(path)
    check_compatible(info.config, cfg, info.path)
    tp, ep, ep_size = layout.tensor_rank, layout.expert_rank, layout.expert_parallel
    model.load_state_dict(_model_state(info.path, tp, ep, ep_size, layout.device))
    if optimizer is not None:
        optimizer.load_state_dict(_load(info.path / _optim_name(tp, ep, ep_size > 1), layout.device))
    rng_file = info.path / f"rng_rank{layout.rank:03d}.pt"
    if rng_file.is_file() and info.meta["world_size"] == layout.world_size:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(info.meta["step"])


def load_merged_state(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The model's state dict as a single TP=1 model would hold it (TP shards merged)."""
    info = read_checkpoint_info(path)
    tp, ep = info.meta["tensor_parallel"], info.meta.get("expert_parallel", 1)
    shards = [_load(info.path / f"model_tp{r:02d}.pt", "cpu") for r in range(tp)]
    if ep > 1:  # experts are whole on every TP rank and split over EP ranks along dim 0
        per_rank = [_load(info.path / f"experts_ep{e:02d}.pt", "cpu") for e in range(ep)]
        experts = {k: torch.cat([part[k] for part in per_rank], dim=0) for k in per_rank[0]}
        for shard in shards:
            shard.update(experts)
    state = merge_tensor_parallel(shards, info.meta["partition_dims"], info.meta["gated_mlp"])
    return info, state


def single_process_config(cfg: Config) -> Config:
    """The same config for a TP=1 process (used to rebuild a merged model for export/sampling)."""
    raw = cfg.to_dict()
    raw["parallel"]["tensor"] = 1
    raw["parallel"]["expert"] = 1
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # pragma: no cover - a saved config was validated when it was saved
        raise CheckpointError(str(e)) from None
