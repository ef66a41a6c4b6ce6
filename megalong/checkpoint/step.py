"""Saving and loading one step directory, the same for every engine and format: written under a
temporary name, committed by meta.json (last) and a rename, then `latest` and `train.keep_last`;
read back with its meta.json and config checked, the model config compared, the engine's or the
format's files read, and the RNG states restored."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from megalong.checkpoint import layout as save_dirs
from megalong.checkpoint.files import (CONFIG, FORMAT_VERSION, META, TOKENIZER, load_rng, read_config, read_meta,
                                       save_rng, write_text_atomically)
from megalong.checkpoint.format import checkpoint_format
from megalong.checkpoint.names import OUTPUT_LAYER
from megalong.checkpoint.ranks import barrier
from megalong.config import Config, ConfigError, architecture_differences, config_from_dict
from megalong.errors import CheckpointError
from megalong.parallel.distributed import ParallelLayout

# meta.json's "engine" (absent: megatron), and how to resume a checkpoint another engine wrote
RESUME_WITH = {"megatron": "train.engine: megatron", "deepspeed": "train.engine: deepspeed (or export it)"}
ENGINE_NAMES = {"megatron": "megatron", "deepspeed": "DeepSpeed"}


@dataclass
class CheckpointInfo:
    path: Path
    config: Config
    meta: dict

    @property
    def engine(self) -> str:
        return self.meta.get("engine", "megatron")


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank{rank:03d}.safetensors"


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The step directory `path` names (or the newest in a save_dir), its meta.json and config,
    both checked."""
    path = save_dirs.resolve_checkpoint(path)
    meta = read_meta(path)
    return CheckpointInfo(path=path, config=read_config(path), meta=meta)


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Refuse a checkpoint whose architecture (model section) differs from the current config's;
    any parallel layout and any execution, train or data settings load."""
    differing = architecture_differences(saved, current)
    if differing:
        details = "; ".join(differing)
        raise CheckpointError(f"checkpoint {path} was trained with another model config: {details}")


def layout_meta(layout: ParallelLayout) -> dict[str, int]:
    return {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel, "expert_parallel": layout.expert_parallel,
            "world_size": layout.world_size}


def begin(save_dir: Path, step: int, rank: int) -> tuple[Path, Path]:
    """(temporary directory to write into, final directory); collective."""
    final = save_dir / save_dirs.step_dir_name(step)
    tmp = save_dirs.temporary_name(final)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    return tmp, final


def commit(tmp: Path, final: Path, cfg: Config, tokenizer_path: str, meta: dict,
           resumed_from: Optional[Path]) -> None:
    """Rank 0, after every rank wrote its files: config, tokenizer, meta.json (last), the rename,
    `latest`, and `train.keep_last`'s cleanup."""
    (tmp / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    (tmp / META).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    if final.exists():  # a run resumed from an earlier step writes this step again
        save_dirs.remove_checkpoint(final)
    tmp.rename(final)
    write_text_atomically(final.parent / save_dirs.LATEST, final.name + "\n")
    if cfg.train.keep_last:
        save_dirs.remove_old_checkpoints(final.parent, cfg.train.keep_last, final, resumed_from)


def save_step(save_dir: str | Path, step: int, cfg: Config, layout: ParallelLayout,
              write_files: Callable[[Path], dict[str, Any]], tokenizer_vocab_size: int,
              resumed_from: Optional[Path] = None, run_meta: Optional[dict[str, str]] = None) -> Path:
    """Save on every rank (collective); returns the final directory. `write_files(tmp)` writes
    this rank's model and optimizer files and returns meta.json's entries for them (its "format"
    first); `resumed_from` is never deleted by `train.keep_last`; `run_meta`: rank 0's entries
    about the run's logging (the W&B run id)."""
    tmp, final = begin(Path(save_dir), step, layout.rank)
    entries = write_files(tmp)
    save_rng(rng_file(tmp, layout.rank))
    barrier()
    if layout.rank == 0:
        meta = {"step": step, "format": entries.pop("format"), **layout_meta(layout),
                "tokenizer_vocab_size": tokenizer_vocab_size, "gated_mlp": cfg.model.gated_mlp,
                **entries, **(run_meta or {})}
        commit(tmp, final, cfg, cfg.data.tokenizer, meta, resumed_from)
    barrier()
    return final


def load_step(path: str | Path, cfg: Config, layout: ParallelLayout, engine: str,
              read_files: Callable[[CheckpointInfo], None]) -> int:
    """Check the checkpoint `path` names against `cfg` and the `engine` resuming it, let
    `read_files` restore weights and optimizer state, restore the RNG states; returns the step."""
    info = read_checkpoint_info(path)
    check_compatible(info.config, cfg, info.path)
    if info.engine != engine:
        raise CheckpointError(f"checkpoint {info.path} was written by the {ENGINE_NAMES[info.engine]} engine; "
                              f"resume it with {RESUME_WITH[info.engine]}")
    read_files(info)
    restore_rng(info, layout)
    return int(info.meta["step"])


def restore_rng(info: CheckpointInfo, layout: ParallelLayout) -> None:
    """Every process's RNG states, when the checkpoint has as many processes (else they stay as
    seeded: a run at another layout cannot repeat the same random numbers anyway)."""
    if info.meta["world_size"] == layout.world_size:
        load_rng(rng_file(info.path, layout.rank))


def missing_entries(full: dict, wanted: set[str], path: Path) -> None:
    absent = sorted(wanted - full.keys())
    if absent:
        raise CheckpointError(f"{path}: the model's {absent[:5]} are not in the checkpoint")


def whole_model_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The one-process model's weights, each parameter meta.json names present (any engine)."""
    state = checkpoint_format(info.meta.get("format", "megalong")).whole_model(info)
    expected = set(info.meta["partition_dims"]) - ({OUTPUT_LAYER} if info.config.model.tie_embeddings else set())
    missing_entries(state, expected, info.path)
    return state


def load_merged_state(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
    """The model's state dict as a single one-process model would hold it, from any layout."""
    info = read_checkpoint_info(path)
    return info, whole_model_state(info)


def single_process_config(cfg: Config) -> Config:
    """The same config for a single process (used to rebuild a merged model for export/sampling)."""
    raw = cfg.to_dict()
    raw["parallel"].update({"tensor": 1, "expert": 1, "pipeline": 1, "virtual_stages": 1,
                            "pipeline_layers": None})
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # pragma: no cover - a saved config was validated when it was saved
        raise CheckpointError(str(e)) from None
