"""GPTNeoForCausalLM as a megalong model: learned positions, global/local layers (`attention_types`,
`window_size`), LayerNorm, GELU tanh, unscaled attention, bias-free q/k/v, tied embeddings (the
inverse of megalong/export/gpt_neo.py)."""
from __future__ import annotations

from typing import Any

import torch

from megalong.config.layers import expand_layer_pattern
from megalong.config.errors import ConfigError
from megalong.export.gpt_neo import compact_pattern
from megalong.export.qkv import fuse_qkv
from megalong.hf_import.folder import Tensors
from megalong.hf_import.hf_keys import HFConfig


def model_section(c: HFConfig) -> dict[str, Any]:
    layers, hidden = c.require("num_layers"), c.require("hidden_size")
    heads, vocab = c.require("num_heads"), c.require("vocab_size")
    c.expect("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "megalong's GELU is the tanh "
             "approximation (gelu_new)", "gelu_new")
    if not c.get("tie_word_embeddings", True):
        c.refuse("tie_word_embeddings", "GPT-Neo ties input and output embeddings")
    if hidden % heads:
        c.refuse("num_heads", f"does not divide hidden_size {hidden}")
    try:
        kinds = expand_layer_pattern(c.require("attention_types"), "attention_types")
    except ConfigError as e:
        c.refuse("attention_types", str(e))
    if len(kinds) != layers or not set(kinds) <= {"global", "local"}:
        c.refuse("attention_types", f"expected {layers} layers of 'global' or 'local'")
    dropout = float(c.get("resid_dropout", 0.0))
    if float(c.get("embed_dropout", dropout)) != dropout:
        c.refuse("embed_dropout", "megalong's model.hidden_dropout is one value (resid_dropout differs)")
    m: dict[str, Any] = {
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "ffn_hidden_size": c.get("intermediate_size", 4 * hidden),
        "max_position_embeddings": c.require("max_position_embeddings"),
        "attention_layers": compact_pattern(kinds),
        "position_embedding": "learned", "normalization": "LayerNorm",
        "layernorm_epsilon": float(c.get("layer_norm_epsilon", 1e-5)), "activation": "gelu_tanh",
        "scale_attention": False, "qkv_bias": False, "linear_bias": True, "tie_embeddings": True,
        "hidden_dropout": dropout, "attention_dropout": float(c.get("attention_dropout", 0.0)),
        "init_std": float(c.get("initializer_range", 0.02)),
        "vocab_size": vocab, "make_vocab_size_divisible_by": c.vocab_divisor(vocab),
    }
    if "local" in kinds:
        m["attention"] = {"local": {"window": c.require("window_size")}}
    return m


def megalong_state(m: dict[str, Any], t: Tensors) -> dict[str, torch.Tensor]:
    heads = m["num_attention_heads"]
    out = {"embedding.word_embeddings.weight": t.take("transformer.wte.weight"),
           "embedding.position_embeddings.weight": t.take("transformer.wpe.weight"),
           "decoder.final_layernorm.weight": t.take("transformer.ln_f.weight"),
           "decoder.final_layernorm.bias": t.take("transformer.ln_f.bias")}
    t.drop("lm_head.weight")  # tied to wte
    names = {"input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2",
             "self_attention.linear_proj": "attn.attention.out_proj",
             "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}
    for i in range(m["num_layers"]):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(t.take(src + f"attn.attention.{p}_proj.weight") for p in "qkv"), heads, heads)
        for ours, theirs in names.items():
            out[dst + ours + ".weight"] = t.take(src + theirs + ".weight")
            out[dst + ours + ".bias"] = t.take(src + theirs + ".bias")
    return out
