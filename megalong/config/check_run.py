"""Validation of how a run executes and trains: the execution, data and train sections."""
from __future__ import annotations

import re
from pathlib import Path

from megalong.attention.options import ATTENTION_OPTIONS
from megalong.config.check_model import positive
from megalong.config.errors import ConfigError
from megalong.config.schema import Config

_PLAIN_NUMBER = re.compile(r"[0-9]*\.?[0-9]+|[0-9]+\.")


def validate_execution(cfg: Config) -> None:
    """Chunk counts dividing the sequence; recompute settings complete and not with reversible."""
    e, m = cfg.execution, cfg.model
    for name in ("ffn_chunks", "loss_chunks"):
        chunks = getattr(e, name)
        if chunks < 1:
            raise ConfigError(f"execution.{name}: must be >= 1, got {chunks}")
        if cfg.seq_length % chunks:
            raise ConfigError(f"execution.{name}: {chunks} does not divide the sequence length "
                              f"{cfg.seq_length}")
    if m.reversible and e.recompute_granularity is not None:
        raise ConfigError("execution.recompute_granularity: reversible layers (model.reversible) "
                          "already recompute their inputs; use one or the other")
    if e.recompute_granularity == "full":
        if e.recompute_method is None or e.recompute_num_layers is None:
            raise ConfigError("execution.recompute_granularity: full recompute needs "
                              "execution.recompute_method (uniform or block) and "
                              "execution.recompute_num_layers")
        if not 1 <= e.recompute_num_layers <= m.num_layers:
            raise ConfigError(f"execution.recompute_num_layers: must be between 1 and model.num_layers "
                              f"{m.num_layers}, got {e.recompute_num_layers}")
    elif e.recompute_method is not None or e.recompute_num_layers is not None:
        raise ConfigError("execution.recompute_method: only used with execution.recompute_granularity: full")


def validate_data(cfg: Config) -> None:
    d = cfg.data
    shares = [share.strip() for share in d.split.split(",")]
    # Plain decimals only (megatron re-reads the string with the pattern [.0-9]+; no nan or 1e3).
    if len(shares) != 3 or not all(_PLAIN_NUMBER.fullmatch(share) for share in shares):
        raise ConfigError(f"data.split: expected three comma-separated shares like '98,2,0', got '{d.split}'")
    if sum(float(share) for share in shares) <= 0:
        raise ConfigError(f"data.split: the shares add up to 0: '{d.split}'")
    if d.tokenizer is not None and d.tokenizer.endswith(".json"):
        raise ConfigError(f"data.tokenizer: {d.tokenizer} looks like a Hugging Face tokenizer.json; "
                          "training reads a SentencePiece .model (tokenizer.json is for preprocess only)")
    for i, entry in enumerate(d.train):
        if not entry.path:
            raise ConfigError(f"data.train[{i}].path: missing")
        if entry.path.endswith((".bin", ".idx")):
            raise ConfigError(f"data.train[{i}].path: give the .bin/.idx prefix without the suffix: "
                              f"{entry.path[:-4]}, not {entry.path}")
        positive(entry.weight, f"data.train[{i}].weight")
    validate_documents(cfg)


def validate_documents(cfg: Config) -> None:
    """data.document_mask only with kinds that keep documents apart; reset_position_ids only where
    there are absolute positions to reset, or with the mask (relative positions: RoPE, ALiBi)."""
    d, m = cfg.data, cfg.model
    if d.document_mask:
        for kind in dict.fromkeys(cfg.layer_kinds()):
            if not ATTENTION_OPTIONS[kind].supports_document_mask:
                raise ConfigError(f"data.document_mask: '{kind}' attention does not keep packed "
                                  "documents apart yet; use other kinds or document_mask: false")
    if d.reset_position_ids and m.position_embedding not in ("learned", "axial") and not d.document_mask:
        what = "ALiBi" if m.alibi else m.position_embedding
        raise ConfigError(f"data.reset_position_ids: with {what} positions (relative) it needs "
                          "data.document_mask: true (the mask is what restarts relative distances "
                          "at each document; without it there is no position to reset)")


def validate_train(cfg: Config) -> None:
    t = cfg.train
    for name in ("micro_batch_size", "global_batch_size", "train_steps", "lr", "eval_interval",
                 "eval_iters", "log_interval", "save_interval", "stop_at_step", "lr_decay_steps",
                 "peak_tflops", "adam_eps", "max_skipped_steps", "keep_last", "eval_tasks_interval",
                 "eval_tasks_limit"):
        positive(getattr(t, name), f"train.{name}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(t, name)}")
    for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}: must be >= 0, got {getattr(t, name)}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is larger than train.lr {t.lr}")
    if t.lr * t.weight_decay >= 1:
        raise ConfigError(f"train.weight_decay: train.lr x train.weight_decay = {t.lr * t.weight_decay:g} "
                          f">= 1; decoupled weight decay would flip the sign of every weight")
    if t.lr_decay_steps is not None and t.lr_decay_steps < t.warmup_steps:
        raise ConfigError(f"train.lr_decay_steps: {t.lr_decay_steps} is shorter than train.warmup_steps "
                          f"{t.warmup_steps} (decay steps count from step 0, warmup included)")
    if t.stop_at_step is not None and t.stop_at_step > t.train_steps:
        raise ConfigError(f"train.stop_at_step: {t.stop_at_step} is past train.train_steps {t.train_steps} "
                          f"(the run ends at train_steps; raise it to train longer)")
    if not 0 <= t.seed < 2**31:
        raise ConfigError(f"train.seed: must be in [0, 2^31), got {t.seed}")
    validate_wandb(cfg)
    validate_profile(cfg)
    validate_eval_tasks(cfg)


def validate_wandb(cfg: Config) -> None:
    """train.wandb: a project (non-empty) whenever entity or name is given."""
    w = cfg.train.wandb
    for name in ("project", "entity", "name"):
        value = getattr(w, name)
        if value is not None and not value.strip():
            raise ConfigError(f"train.wandb.{name}: must not be empty")
    if w.project is None:
        for name in ("entity", "name"):
            if getattr(w, name) is not None:
                raise ConfigError(f"train.wandb.{name}: given without train.wandb.project "
                                  f"(W&B logs only when a project is set)")


def validate_profile(cfg: Config) -> None:
    """train.profile: steps inside the run, and somewhere to write the trace."""
    t = cfg.train
    p = t.profile
    if p.start_step is None:
        if p.dir is not None:
            raise ConfigError("train.profile.dir: given without train.profile.start_step (the first "
                              "step to profile)")
        return
    positive(p.start_step, "train.profile.start_step")
    positive(p.steps, "train.profile.steps")
    last = p.start_step + p.steps - 1
    if last > t.train_steps:
        raise ConfigError(f"train.profile.steps: the profile would end at step {last}, past "
                          f"train.train_steps {t.train_steps}")
    if p.dir is None and not t.save_dir:
        raise ConfigError("train.profile.dir: needed without train.save_dir (the default is "
                          "<save_dir>/profile)")


def validate_eval_tasks(cfg: Config) -> None:
    t = cfg.train
    for i, task in enumerate(t.eval_tasks):
        if not isinstance(task, str) or not task:
            raise ConfigError(f"train.eval_tasks[{i}]: expected an lm-eval task name, got {task!r}")
    names = [entry.name for entry in cfg.data.train if entry.name is not None]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.train: two entries share a name: {names}")
    if not t.eval_tasks:
        return
    if t.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.eval_tasks: not with deepspeed.zero_stage 3 (its weights are partitioned "
                          "outside the forward); evaluate the checkpoint with `megalong eval --tasks`")
    if cfg.parallel.virtual_stages > 1:
        raise ConfigError("train.eval_tasks: not with parallel.virtual_stages > 1; evaluate the "
                          "checkpoint with `megalong eval --tasks --pipeline N`")
    if cfg.parallel.context > 1:
        raise ConfigError("train.eval_tasks: not with parallel.context > 1 (lm-eval requests are "
                          "whole sequences); evaluate the checkpoint with `megalong eval --tasks`")


def validate_paths(cfg: Config) -> None:
    """The tokenizer and every dataset's .bin/.idx exist."""
    d = cfg.data
    if not d.tokenizer:
        raise ConfigError("data.tokenizer: missing (path to a SentencePiece .model)")
    if not Path(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: file not found: {d.tokenizer}")
    if not d.train:
        raise ConfigError("data.train: no datasets given (list of .bin/.idx prefixes)")
    for i, entry in enumerate(d.train):
        for suffix in (".bin", ".idx"):
            if not Path(entry.path + suffix).is_file():
                raise ConfigError(f"data.train[{i}].path: {entry.path}{suffix} not found")
