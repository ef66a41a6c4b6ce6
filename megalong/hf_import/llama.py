"""LlamaForCausalLM, MistralForCausalLM (sliding window), Qwen2ForCausalLM (q/k/v biases, per-layer
sliding or full attention) and MixtralForCausalLM as megalong models: RMSNorm, RoPE, SwiGLU (or
Mixtral's top-k experts), q/k/v fused the way megatron lays them out."""
from __future__ import annotations

from typing import Any

import torch

from megalong.export.gpt_neo import compact_pattern
from megalong.export.qkv import fuse_qkv
from megalong.hf_import.folder import HFImportError, Tensors
from megalong.hf_import.hf_keys import HFConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}


def layer_kinds(c: HFConfig, family: str, layers: int) -> list[str]:
    """"global" or "local" per layer, from `layer_types` or the family's sliding-window keys."""
    types = c.raw.get("layer_types")
    if types is not None:
        if len(types) != layers:
            c.refuse("layer_types", f"{len(types)} entries for {layers} layers")
        table = {"full_attention": "global", "sliding_attention": "local"}
        for t in types:
            if t not in table:
                c.refuse("layer_types", f"{t!r} is not full_attention or sliding_attention")
        kinds = [table[t] for t in types]
    elif family == "qwen2":
        sliding = c.get("use_sliding_window", False) and c.get("sliding_window") is not None
        first_sliding = c.get("max_window_layers", layers)
        kinds = ["local" if sliding and i >= first_sliding else "global" for i in range(layers)]
    else:
        kinds = ["local" if c.get("sliding_window") is not None else "global"] * layers
    if "local" in kinds and c.get("sliding_window") is None:
        c.refuse("sliding_window", "sliding layers need a window")
    return kinds


def model_section(c: HFConfig, family: str) -> dict[str, Any]:
    """megalong's `model` section for the config; what it cannot express is refused by key."""
    layers, hidden, heads = c.require("num_hidden_layers"), c.require("hidden_size"), c.require("num_attention_heads")
    vocab = c.require("vocab_size")
    c.expect("hidden_act", ("silu",), "megalong's gated MLP is SwiGLU (silu)", "silu")
    if hidden % heads or c.get("head_dim", hidden // heads) != hidden // heads:
        c.refuse("head_dim", f"megalong's heads are hidden_size / num_attention_heads = {hidden / heads:g} wide")
    groups = c.get("num_key_value_heads", heads)
    if not isinstance(groups, int) or groups < 1 or heads % groups:
        c.refuse("num_key_value_heads", f"must divide num_attention_heads {heads}")
    if c.get("mlp_bias", False) != c.get("attention_bias", False):
        c.refuse("mlp_bias", "megalong's model.linear_bias sets the output projection's and the MLP's "
                             "biases together (attention_bias differs)")
    attention_bias = c.get("attention_bias", False)
    kinds = layer_kinds(c, family, layers)
    m: dict[str, Any] = {
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "num_query_groups": groups if groups != heads else None,
        "ffn_hidden_size": c.require("intermediate_size"),
        "max_position_embeddings": c.require("max_position_embeddings"),
        "attention_layers": compact_pattern(kinds),
        "position_embedding": "rope", "rotary_base": c.rope_base(),
        "normalization": "RMSNorm", "layernorm_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu", "scale_attention": True,
        "qkv_bias": family == "qwen2" or attention_bias, "linear_bias": attention_bias,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "hidden_dropout": 0.0, "attention_dropout": float(c.get("attention_dropout", 0.0)),
        "init_std": float(c.get("initializer_range", 0.02)),
        "vocab_size": vocab, "make_vocab_size_divisible_by": c.vocab_divisor(vocab),
    }
    if "local" in kinds:
        m["attention"] = {"local": {"window": c.require("sliding_window")}}
    if family == "mixtral":
        if c.get("router_jitter_noise", 0.0):
            c.refuse("router_jitter_noise", "megalong's top-k router has no jitter noise")
        m["mlp_layers"] = [[["moe"], layers]]
        m["moe"] = {"num_experts": c.require("num_local_experts"), "top_k": c.require("num_experts_per_tok"),
                    "router": "topk", "dropless": True, "capacity_factor": None,
                    "aux_loss_coeff": float(c.get("router_aux_loss_coef", 0.01))}
    return m


def megalong_state(m: dict[str, Any], family: str, t: Tensors) -> dict[str, torch.Tensor]:
    """The HF tensors under megalong's (megatron's) names."""
    heads = m["num_attention_heads"]
    groups = m["num_query_groups"] or heads
    out = {"embedding.word_embeddings.weight": t.take("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": t.take("model.norm.weight")}
    if m["tie_embeddings"]:
        t.drop("lm_head.weight")  # a tied copy, when a version saved it
    else:
        out["output_layer.weight"] = t.take("lm_head.weight")
    for i in range(m["num_layers"]):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = t.take(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = t.take(src + "post_attention_layernorm.weight")
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(t.take(attn + f"{p}_proj.weight") for p in "qkv"), heads, groups)
        if m["qkv_bias"]:
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                *(t.take(attn + f"{p}_proj.bias") for p in "qkv"), heads, groups)
        out[dst + "self_attention.linear_proj.weight"] = t.take(attn + "o_proj.weight")
        if m["linear_bias"]:
            out[dst + "self_attention.linear_proj.bias"] = t.take(attn + "o_proj.bias")
        if family == "mixtral":
            moe = src + "block_sparse_moe."
            out[dst + "mlp.router.weight"] = t.take(moe + "gate.weight")
            # megalong's aux-loss-free selection bias (model.moe.bias_update_rate), unused: zero
            out[dst + "mlp.router.expert_bias"] = torch.zeros(m["moe"]["num_experts"], dtype=torch.float64)
            # megalong's experts compute x @ W with W [E, in, out]; torch Linear weights are [out, in].
            for name in ("w1", "w2", "w3"):
                out[dst + f"mlp.experts.{name}"] = torch.stack(
                    [t.take(moe + f"experts.{j}.{name}.weight").t() for j in range(m["moe"]["num_experts"])])
            continue
        mlp = src + "mlp."
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([t.take(mlp + "gate_proj.weight"),
                                                        t.take(mlp + "up_proj.weight")])
        out[dst + "mlp.linear_fc2.weight"] = t.take(mlp + "down_proj.weight")
        if m["linear_bias"]:
            out[dst + "mlp.linear_fc1.bias"] = torch.cat([t.take(mlp + "gate_proj.bias"), t.take(mlp + "up_proj.bias")])
            out[dst + "mlp.linear_fc2.bias"] = t.take(mlp + "down_proj.bias")
    return out


def check_family(c: HFConfig, architecture: str) -> str:
    family = ARCHITECTURES[architecture]
    model_type = c.get("model_type", family)
    if model_type != family:
        raise HFImportError(f"{c.path}: model_type = {model_type!r} but architectures names {architecture}")
    return family
