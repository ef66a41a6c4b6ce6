"""Validation of the `model` section: sizes, attention kinds and their options, MoE, positions.

What a kind supports comes from its options class (megalong/attention/options.py), never from
its name.
"""
from __future__ import annotations

from typing import Any

from megalong.attention.options import ATTENTION_OPTIONS, OptionError
from megalong.config.errors import ConfigError, suggest
from megalong.config.schema import Config

MLP_KINDS = ("dense", "moe")


def positive(value: Any, key: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def validate_model_sizes(cfg: Config) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
                 "rotary_base", "init_std", "layernorm_epsilon"):
        positive(getattr(m, name), f"model.{name}")
    if m.position_embedding == "rope" and m.rotary_base < 2:
        raise ConfigError(f"model.rotary_base: must be > 1 (every rotary frequency would be 1), "
                          f"got {m.rotary_base}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(m, name)}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads: {m.num_attention_heads} heads do not divide "
                          f"model.hidden_size {m.hidden_size}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(f"model.num_query_groups: {m.query_groups} groups do not divide "
                          f"model.num_attention_heads {m.num_attention_heads}")
    if m.query_groups != m.num_attention_heads and "lsh" in cfg.layer_kinds():
        raise ConfigError("model.num_query_groups: lsh layers share queries and keys (no separate key "
                          "heads to group); grouped-query attention needs other kinds")


def validate_attention(cfg: Config) -> None:
    """Every layer's kind known, one per layer, and each used kind's options fit the model."""
    kinds = cfg.layer_kinds()
    for i, kind in enumerate(kinds):
        if kind not in ATTENTION_OPTIONS:
            raise ConfigError(f"model.attention_layers: unknown attention kind '{kind}' (layer {i})"
                              f"{suggest(kind, ATTENTION_OPTIONS)}")
    if len(kinds) != cfg.model.num_layers:
        raise ConfigError(f"model.attention_layers: the pattern expands to {len(kinds)} layers but "
                          f"model.num_layers is {cfg.model.num_layers}")
    shape = cfg.model_shape()
    for kind in dict.fromkeys(kinds):
        try:
            cfg.attention_options(kind).check(shape)
        except OptionError as e:
            raise ConfigError(f"model.attention.{kind}.{e.key}: {e.message}") from None


def validate_moe(cfg: Config) -> None:
    kinds = cfg.mlp_kinds()
    for i, kind in enumerate(kinds):
        if kind not in MLP_KINDS:
            raise ConfigError(f"model.mlp_layers: unknown MLP kind '{kind}' (layer {i})"
                              f"{suggest(kind, MLP_KINDS)}")
    if len(kinds) != cfg.model.num_layers:
        raise ConfigError(f"model.mlp_layers: the pattern expands to {len(kinds)} layers but "
                          f"model.num_layers is {cfg.model.num_layers}")
    o = cfg.model.moe
    if o.num_experts < 1:
        raise ConfigError(f"model.moe.num_experts: must be >= 1, got {o.num_experts}")
    if not 1 <= o.top_k <= o.num_experts:
        raise ConfigError(f"model.moe.top_k: {o.top_k} must be between 1 and model.moe.num_experts "
                          f"{o.num_experts}")
    if o.bias_update_rate < 0:
        raise ConfigError(f"model.moe.bias_update_rate: must be >= 0, got {o.bias_update_rate}")
    if o.bias_update_rate and o.router not in ("topk", "switch"):
        raise ConfigError(f"model.moe.bias_update_rate: bias balancing is for the topk and switch "
                          f"routers, not '{o.router}'")
    if o.router == "switch" and o.top_k != 1:
        raise ConfigError(f"model.moe.top_k: the switch router sends each token to one expert; set "
                          f"top_k: 1 (it is {o.top_k}) or use router: topk")
    if o.capacity_factor is not None and o.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor: must be > 0 (or null with dropless), got {o.capacity_factor}")
    if o.capacity_factor is None and not o.dropless:
        raise ConfigError("model.moe.capacity_factor: null needs model.moe.dropless: true")
    positive(o.expert_hidden_size, "model.moe.expert_hidden_size")
    if o.num_shared_experts < 0:
        raise ConfigError(f"model.moe.num_shared_experts: must be >= 0, got {o.num_shared_experts}")
    for name in ("aux_loss_coeff", "z_loss_coeff"):
        if getattr(o, name) < 0:
            raise ConfigError(f"model.moe.{name}: must be >= 0, got {getattr(o, name)}")


def validate_kind_capabilities(cfg: Config) -> None:
    """ALiBi, RoPE and MoE MLPs only in layers whose attention kind supports them."""
    m = cfg.model
    kinds = cfg.layer_kinds()
    for kind in dict.fromkeys(kinds):
        if m.alibi and not ATTENTION_OPTIONS[kind].supports_alibi:
            raise ConfigError(f"model.alibi: '{kind}' attention has no attention scores to bias; "
                              "use ALiBi without it")
    if m.alibi and m.position_embedding != "none":
        raise ConfigError("model.alibi: ALiBi replaces position embeddings; set "
                          f"model.position_embedding: none (it is '{m.position_embedding}')")
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError("model.position_embedding: rope needs an even head dimension")
    for kind in dict.fromkeys(kinds):
        if m.position_embedding == "rope" and not ATTENTION_OPTIONS[kind].supports_rope:
            raise ConfigError(f"model.position_embedding: {kind} layers do not support rope; use "
                              "learned, axial, none or ALiBi")
    for kind, mlp in zip(kinds, cfg.mlp_kinds()):
        if mlp == "moe" and ATTENTION_OPTIONS[kind].dense_mlp_only:
            raise ConfigError(f"model.mlp_layers: {kind} layers need a dense MLP, not moe")


def validate_positions(cfg: Config) -> None:
    """Axial position embeddings' shape, and learned positions covering the sequence."""
    m = cfg.model
    shape = m.axial_position.shape
    positive(cfg.data.seq_length, "data.seq_length")
    if m.position_embedding == "learned" and cfg.seq_length > m.max_position_embeddings:
        raise ConfigError(f"data.seq_length: {cfg.seq_length} exceeds model.max_position_embeddings "
                          f"{m.max_position_embeddings} (learned positions cannot extrapolate)")
    if m.position_embedding != "axial":
        if shape is not None:
            raise ConfigError("model.axial_position: set, but model.position_embedding is "
                              f"'{m.position_embedding}', not axial")
        return
    if (not isinstance(shape, list) or len(shape) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in shape)):
        raise ConfigError(f"model.axial_position.shape: expected [rows, cols], two positive integers, "
                          f"got {shape!r}")
    if shape[0] * shape[1] < cfg.seq_length:
        raise ConfigError(f"model.axial_position.shape: {shape[0]} x {shape[1]} positions are fewer "
                          f"than the sequence length {cfg.seq_length}")
    if m.axial_position.mode == "concat" and m.hidden_size < 2:
        raise ConfigError("model.axial_position.mode: concat needs model.hidden_size >= 2")
