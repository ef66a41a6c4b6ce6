"""megalong (megatron GPTModel) state dict -> Hugging Face GPTNeoForCausalLM, when the model is one."""
from __future__ import annotations

from typing import Optional

import torch

from megalong.config import Config


def gpt_neo_refusal(cfg: Config) -> Optional[str]:
    """Why this model is not a plain GPT-Neo (None when it is). Each reason names the config key."""
    m = cfg.model
    checks = [
        (m.position_embedding == "learned", f"model.position_embedding is '{m.position_embedding}' (GPT-Neo has learned positions)"),
        (not m.alibi, "model.alibi is true (GPT-Neo has no ALiBi)"),
        (m.normalization == "LayerNorm", f"model.normalization is '{m.normalization}' (GPT-Neo uses LayerNorm)"),
        (m.activation == "gelu_tanh", f"model.activation is '{m.activation}' (GPT-Neo uses GELU tanh, 'gelu_new')"),
        (not m.scale_attention, "model.scale_attention is true (GPT-Neo does not scale attention scores)"),
        (not m.qkv_bias, "model.qkv_bias is true (GPT-Neo's q/k/v projections have no bias)"),
        (m.linear_bias, "model.linear_bias is false (GPT-Neo's output and MLP projections have biases)"),
        (m.tie_embeddings, "model.tie_embeddings is false (GPT-Neo ties input and output embeddings)"),
        (m.query_groups == m.num_attention_heads, "model.num_query_groups: GPT-Neo has one key/value head per query head"),
        (set(cfg.mlp_kinds()) == {"dense"}, "model.mlp_layers has MoE layers (GPT-Neo's MLPs are dense)"),
        (not m.reversible, "model.reversible is true (GPT-Neo's layers are not reversible pairs)"),
        (set(cfg.layer_kinds()) <= {"global", "local"},
         f"model.attention_layers uses {sorted(set(cfg.layer_kinds()) - {'global', 'local'})} (GPT-Neo has global and local only)"),
        ("local" not in cfg.layer_kinds() or (cfg.attention_options("local").dilation == 1
                                               and not cfg.attention_options("local").global_tokens),
         "model.attention.local has dilation or global_tokens (GPT-Neo's local attention has neither)"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return "; ".join(reasons) if reasons else None


def compact_pattern(kinds: list[str]) -> list:
    """["global", "local", "global", "local"] -> [[["global", "local"], 2]] (GPT-Neo's form)."""
    for period in range(1, len(kinds) + 1):
        if len(kinds) % period == 0 and kinds == kinds[:period] * (len(kinds) // period):
            return [[kinds[:period], len(kinds) // period]]
    raise AssertionError("unreachable: the whole list is always a period")


def split_qkv(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused [3h, h] q/k/v weight is laid out per head as [heads, (q, k, v), head_dim, h]."""
    hidden = weight.shape[1]
    per_head = weight.view(heads, 3, -1, hidden)
    return tuple(per_head[:, i].reshape(-1, hidden).contiguous() for i in range(3))


def to_gpt_neo(cfg: Config, state: dict[str, torch.Tensor], bos_id: int, eos_id: int):
    """(transformers.GPTNeoConfig, HF state dict) for a model that gpt_neo_refusal accepts."""
    from transformers import GPTNeoConfig

    m = cfg.model
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    hf_config = GPTNeoConfig(
        vocab_size=vocab,
        max_position_embeddings=m.max_position_embeddings,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        attention_types=compact_pattern(cfg.layer_kinds()),
        num_heads=m.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        window_size=cfg.attention_options("local").window,
        activation_function="gelu_new",
        resid_dropout=m.hidden_dropout,
        embed_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layer_norm_epsilon=m.layernorm_epsilon,
        initializer_range=m.init_std,
        bos_token_id=bos_id if bos_id >= 0 else eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    out = {
        "transformer.wte.weight": state["embedding.word_embeddings.weight"],
        "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": state["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": state["decoder.final_layernorm.bias"],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], m.num_attention_heads)
        out.update({
            dst + "ln_1.weight": state[src + "input_layernorm.weight"],
            dst + "ln_1.bias": state[src + "input_layernorm.bias"],
            dst + "attn.attention.q_proj.weight": q,
            dst + "attn.attention.k_proj.weight": k,
            dst + "attn.attention.v_proj.weight": v,
            dst + "attn.attention.out_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "attn.attention.out_proj.bias": state[src + "self_attention.linear_proj.bias"],
            dst + "ln_2.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "ln_2.bias": state[src + "pre_mlp_layernorm.bias"],
            dst + "mlp.c_fc.weight": state[src + "mlp.linear_fc1.weight"],
            dst + "mlp.c_fc.bias": state[src + "mlp.linear_fc1.bias"],
            dst + "mlp.c_proj.weight": state[src + "mlp.linear_fc2.weight"],
            dst + "mlp.c_proj.bias": state[src + "mlp.linear_fc2.bias"],
        })
    return hf_config, out
