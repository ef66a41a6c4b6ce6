"""Validation of the parallel layout and of the DeepSpeed engine's section."""
from __future__ import annotations

from typing import Any

from megalong.config.check_model import positive
from megalong.config.errors import ConfigError
from megalong.config.schema import Config, DeepSpeedConfig, ParallelConfig

# DeepSpeed keys megalong derives from its own config; deepspeed.config may not set them.
DEEPSPEED_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                          "gradient_accumulation_steps", "gradient_clipping", "optimizer",
                          "scheduler", "bf16", "fp16", "zero_optimization.stage",
                          "zero_optimization.offload_optimizer")


def validate_parallel(cfg: Config, world_size: int) -> None:
    """Tensor, expert and pipeline sizes dividing the model and the processes; the batch split."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    positive(p.tensor, "parallel.tensor")
    if m.num_attention_heads % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide model.num_attention_heads "
                          f"{m.num_attention_heads}")
    if m.query_groups % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide model.num_query_groups "
                          f"{m.query_groups} (each rank holds whole key/value groups)")
    if cfg.ffn_hidden_size % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide the MLP width "
                          f"{cfg.ffn_hidden_size} (model.ffn_hidden_size)")
    positive(p.expert, "parallel.expert")
    if p.expert > 1:
        if "moe" not in cfg.mlp_kinds():
            raise ConfigError(f"parallel.expert: {p.expert} needs MoE layers (model.mlp_layers)")
        if m.moe.num_experts % p.expert:
            raise ConfigError(f"parallel.expert: {p.expert} does not divide model.moe.num_experts "
                              f"{m.moe.num_experts}")
        if world_size % p.expert:
            raise ConfigError(f"parallel.expert: {p.expert} does not divide the {world_size} processes")
    if world_size % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide the {world_size} processes")
    validate_pipeline(cfg, world_size)
    dp = world_size // (p.tensor * p.pipeline * p.context)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")


def validate_data_parallel(cfg: Config) -> None:
    size = cfg.parallel.ddp_bucket_size
    if size is not None and size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size: must be a positive number of elements, got {size}")


def validate_pipeline(cfg: Config, world_size: int) -> None:
    p, n = cfg.parallel, cfg.model.num_layers
    positive(p.pipeline, "parallel.pipeline")
    positive(p.virtual_stages, "parallel.virtual_stages")
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(f"parallel.pipeline: parallel.tensor x parallel.pipeline = {p.tensor} x "
                          f"{p.pipeline} does not divide the {world_size} processes")
    if p.pipeline == 1:
        if p.virtual_stages > 1:
            raise ConfigError(f"parallel.virtual_stages: {p.virtual_stages} needs parallel.pipeline > 1")
        if p.pipeline_layers is not None:
            raise ConfigError("parallel.pipeline_layers: needs parallel.pipeline > 1")
        return
    if p.pipeline_layers is not None:
        _validate_uneven_split(p, n)
    elif n % (p.pipeline * p.virtual_stages):
        raise ConfigError(f"parallel.pipeline: model.num_layers {n} is not a multiple of "
                          f"parallel.pipeline x parallel.virtual_stages = {p.pipeline} x {p.virtual_stages} "
                          f"(or give an uneven split in parallel.pipeline_layers)")
    dp = world_size // (p.tensor * p.pipeline * p.context)
    micro = cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size * dp)
    if p.virtual_stages > 1 and micro % p.pipeline:
        raise ConfigError(f"parallel.virtual_stages: the interleaved schedule needs the number of "
                          f"micro-batches per step ({micro} = train.global_batch_size / "
                          f"(train.micro_batch_size x data-parallel size)) to be a multiple of "
                          f"parallel.pipeline {p.pipeline}")


def _validate_uneven_split(p: ParallelConfig, n: int) -> None:
    layers = p.pipeline_layers or []
    if p.virtual_stages > 1:
        raise ConfigError("parallel.pipeline_layers: an uneven split is not supported with "
                          "parallel.virtual_stages > 1")
    if len(layers) != 2 or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in layers):
        raise ConfigError(f"parallel.pipeline_layers: expected [layers on the first stage, layers "
                          f"on the last stage], two positive integers, got {p.pipeline_layers}")
    rest = n - sum(layers)
    if p.pipeline == 2 and rest != 0:
        raise ConfigError(f"parallel.pipeline_layers: {p.pipeline_layers} must add up to "
                          f"model.num_layers {n} with 2 stages")
    if p.pipeline > 2 and (rest < p.pipeline - 2 or rest % (p.pipeline - 2)):
        raise ConfigError(f"parallel.pipeline_layers: the {rest} layers left after {p.pipeline_layers} "
                          f"do not split evenly over the {p.pipeline - 2} middle stages "
                          f"(model.num_layers {n})")


def validate_deepspeed(cfg: Config) -> None:
    """Which layouts the DeepSpeed engine supports; refused combinations name their key."""
    ds, p = cfg.deepspeed, cfg.parallel
    if ds.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: must be 1, 2 or 3, got {ds.zero_stage}")
    for dotted in DEEPSPEED_DERIVED_KEYS:
        node: Any = ds.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"deepspeed.config.{dotted}: set by megalong (from the train section, "
                              f"deepspeed.zero_stage or deepspeed.offload_optimizer); remove it here")
    if cfg.train.engine != "deepspeed":
        if ds != DeepSpeedConfig():
            raise ConfigError("deepspeed: this section is used only with train.engine: deepspeed")
        return
    if cfg.train.checkpoint_format != "megalong":
        raise ConfigError("train.checkpoint_format: megatron is not supported with train.engine: "
                          "deepspeed (DeepSpeed writes its own checkpoint files)")
    defaults = ParallelConfig()
    for key in ("distributed_optimizer", "overlap_grad_reduce", "ddp_bucket_size"):
        if getattr(p, key) != getattr(defaults, key):
            raise ConfigError(f"parallel.{key}: configures megatron-core's DDP, which train.engine: "
                              f"deepspeed does not use (ZeRO shards the optimizer state: "
                              f"deepspeed.zero_stage)")
    if cfg.execution.compile:
        raise ConfigError("execution.compile: not supported with train.engine: deepspeed (ZeRO's hooks "
                          "on the weights are not traced by torch.compile in megalong); use "
                          "train.engine: megatron")
    if p.pipeline > 1:
        raise ConfigError(f"parallel.pipeline: {p.pipeline} pipeline stages are not supported with "
                          f"train.engine: deepspeed (DeepSpeed's pipeline engine allows only ZeRO-1, and "
                          f"megalong does not run megatron-core's schedules under DeepSpeed); use "
                          f"train.engine: megatron")
    if p.expert > 1:
        raise ConfigError(f"parallel.expert: expert parallelism ({p.expert}) is not supported with "
                          f"train.engine: deepspeed (ZeRO would shard and average expert weights that "
                          f"differ across ranks); MoE layers with parallel.expert: 1 are")
    if ds.zero_stage == 3 and "moe" in cfg.mlp_kinds():
        raise ConfigError("deepspeed.zero_stage: ZeRO-3 is not supported with MoE layers (megalong's "
                          "experts use weights that ZeRO-3 has not gathered in the backward pass); "
                          "use zero_stage 1 or 2")
    if ds.zero_stage == 3 and cfg.train.nonfinite == "skip":
        raise ConfigError("train.nonfinite: skip is not supported with deepspeed.zero_stage 3 (DeepSpeed's "
                          "ZeRO-3 applies an update with a non-finite gradient in fp32 and bf16 and "
                          "cannot drop it); use nonfinite: stop or zero_stage 1 or 2")
