"""megalong MoE model -> Hugging Face MixtralForCausalLM, written with Mixtral's on-disk names
(`block_sparse_moe.gate`, `block_sparse_moe.experts.{j}.w1/w2/w3`) that transformers loads as is."""
from __future__ import annotations

from typing import Optional

import torch

from megalong.config import Config
from megalong.export.llama import outer_weights
from megalong.export.qkv import split_qkv


def mixtral_refusal(cfg: Config) -> Optional[str]:
    """Why this model is not a plain Mixtral (None when it is). Each reason names the config key."""
    m, o = cfg.model, cfg.moe_options()
    checks = [
        (set(cfg.mlp_kinds()) == {"moe"}, "model.mlp_layers: Mixtral has an MoE MLP in every layer"),
        (not m.reversible, "model.reversible is true (Mixtral's layers are not reversible pairs)"),
        (m.gated_mlp, f"model.activation is '{m.activation}' (Mixtral experts are SwiGLU)"),
        (m.normalization == "RMSNorm", f"model.normalization is '{m.normalization}' (Mixtral uses RMSNorm)"),
        (m.position_embedding == "rope", f"model.position_embedding is '{m.position_embedding}' (Mixtral uses RoPE)"),
        (not m.alibi, "model.alibi is true (Mixtral has no ALiBi)"),
        (set(cfg.layer_kinds()) == {"global"}, "model.attention_layers: Mixtral layers are all global"),
        (m.scale_attention, "model.scale_attention is false (Mixtral scales by 1/sqrt(head_dim))"),
        (not m.qkv_bias and not m.linear_bias, "model.linear_bias/qkv_bias: Mixtral's linears have no bias"),
        (o.router == "topk", f"model.moe.router is '{o.router}' (Mixtral routes top-k, renormalised)"),
        (o.dropless, "model.moe.dropless is false (Mixtral never drops tokens)"),
        (o.num_shared_experts == 0, "model.moe.num_shared_experts: Mixtral has no shared experts"),
        (not o.bias_update_rate, "model.moe.bias_update_rate: Mixtral's router has no selection bias"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return "; ".join(reasons) if reasons else None


def to_mixtral(cfg: Config, state: dict[str, torch.Tensor], bos_id: int, eos_id: int):
    """(transformers.MixtralConfig, dict of tensors under Mixtral's on-disk names)."""
    from transformers import MixtralConfig

    m, o = cfg.model, cfg.moe_options()
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    hf_config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=o.expert_hidden_size or cfg.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.layernorm_epsilon,
        rope_theta=float(m.rotary_base),
        num_local_experts=o.num_experts,
        num_experts_per_tok=o.top_k,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        attention_dropout=m.attention_dropout,
        sliding_window=None,
        bos_token_id=bos_id if bos_id >= 0 else eos_id,
        eos_token_id=eos_id,
    )
    out = outer_weights(state, m.tie_embeddings)
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], m.num_attention_heads, m.query_groups)
        out.update({
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "block_sparse_moe.gate.weight": state[src + "mlp.router.weight"],
        })
        # megalong keeps x @ W (W [E, in, out]); torch Linear weights are [out, in].
        for name in ("w1", "w2", "w3"):
            stacked = state[src + f"mlp.experts.{name}"]
            for j in range(o.num_experts):
                out[dst + f"block_sparse_moe.experts.{j}.{name}.weight"] = stacked[j].t().contiguous()
    return hf_config, out
