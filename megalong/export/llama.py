"""megalong dense RoPE/RMSNorm/SwiGLU models as plain LlamaForCausalLM (all global),
MistralForCausalLM (all local: `sliding_window`) or Qwen2ForCausalLM (any global/local mix through
`layer_types`; q/k/v biases, written as zeros for a model without them), under the classes'
on-disk names (the inverse of megalong/hf_import/llama.py)."""
from __future__ import annotations

from typing import Optional

import torch

from megalong.config import Config
from megalong.export.qkv import split_qkv

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _shared_reasons(cfg: Config, name: str) -> list[tuple[bool, str]]:
    m = cfg.model
    local = cfg.attention_options("local") if "local" in cfg.layer_kinds() else None
    return [
        (set(cfg.mlp_kinds()) == {"dense"}, f"model.mlp_layers has MoE layers ({name}'s MLPs are dense)"),
        (not m.reversible, f"model.reversible is true ({name}'s layers are not reversible pairs)"),
        (m.gated_mlp, f"model.activation is '{m.activation}' ({name}'s MLP is SwiGLU)"),
        (m.normalization == "RMSNorm", f"model.normalization is '{m.normalization}' ({name} uses RMSNorm)"),
        (m.position_embedding == "rope", f"model.position_embedding is '{m.position_embedding}' ({name} uses RoPE)"),
        (not m.alibi, f"model.alibi is true ({name} has no ALiBi)"),
        (m.scale_attention, f"model.scale_attention is false ({name} scales by 1/sqrt(head_dim))"),
        (local is None or (local.dilation == 1 and not local.global_tokens),
         f"model.attention.local has dilation or global_tokens ({name}'s sliding window has neither)"),
    ]


def refusal(cfg: Config, target: str) -> Optional[str]:
    """Why this model is not a plain `target` (llama | mistral | qwen2), None when it is."""
    m, kinds = cfg.model, set(cfg.layer_kinds())
    name = CLASSES[target]
    checks = _shared_reasons(cfg, name)
    if target == "llama":
        checks += [(kinds == {"global"}, f"model.attention_layers uses {sorted(kinds - {'global'})} "
                                         "(Llama's layers are all global)"),
                   (m.qkv_bias == m.linear_bias, "model.qkv_bias differs from model.linear_bias (Llama's "
                                                  "attention_bias and mlp_bias give q/k/v, output and MLP biases together)")]
    elif target == "mistral":
        checks += [(kinds == {"local"}, f"model.attention_layers uses {sorted(kinds - {'local'})} "
                                        "(Mistral's layers all use its one sliding window)"),
                   (not m.qkv_bias and not m.linear_bias, "model.linear_bias/qkv_bias: Mistral's linears have no bias")]
    else:
        checks += [(kinds <= {"global", "local"}, f"model.attention_layers uses {sorted(kinds - {'global', 'local'})} "
                                                  "(Qwen2 has full and sliding attention only)"),
                   (not m.linear_bias, "model.linear_bias is true (Qwen2's output and MLP projections have no bias)")]
    reasons = [reason for ok, reason in checks if not ok]
    return "; ".join(reasons) if reasons else None


def to_hf(cfg: Config, state: dict[str, torch.Tensor], target: str, bos_id: int, eos_id: int):
    """(transformers config, tensors under the class's on-disk names) for a model `refusal` accepts."""
    import transformers

    m = cfg.model
    heads, groups, kinds = m.num_attention_heads, m.query_groups, cfg.layer_kinds()
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    window = cfg.attention_options("local").window if "local" in kinds else None
    common = dict(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=heads, num_key_value_heads=groups,
                  max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
                  rope_theta=float(m.rotary_base), tie_word_embeddings=m.tie_embeddings, hidden_act="silu",
                  attention_dropout=m.attention_dropout, initializer_range=m.init_std,
                  bos_token_id=bos_id if bos_id >= 0 else eos_id, eos_token_id=eos_id)
    if target == "llama":
        hf_config = transformers.LlamaConfig(**common, attention_bias=m.qkv_bias, mlp_bias=m.linear_bias)
    elif target == "mistral":
        hf_config = transformers.MistralConfig(**common, sliding_window=window)
    else:
        layer_types = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
        hf_config = transformers.Qwen2Config(**common, use_sliding_window=window is not None,
                                             sliding_window=window, layer_types=layer_types)
    hf_config.architectures = [CLASSES[target]]

    out = outer_weights(state, m.tie_embeddings)
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn, mlp = dst + "self_attn.", dst + "mlp."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"], heads, groups)
        out.update({dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
                    dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
                    attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v,
                    attn + "o_proj.weight": state[src + "self_attention.linear_proj.weight"],
                    mlp + "down_proj.weight": state[src + "mlp.linear_fc2.weight"]})
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = gate, up
        if m.qkv_bias:
            biases = split_qkv(state[src + "self_attention.linear_qkv.bias"], heads, groups)
        else:  # Qwen2's q/k/v always have biases: zeros compute the same
            biases = (torch.zeros(q.shape[0]), torch.zeros(k.shape[0]), torch.zeros(v.shape[0]))
        if m.qkv_bias or target == "qwen2":
            out.update({attn + f"{p}_proj.bias": b for p, b in zip("qkv", biases)})
        if m.linear_bias:
            out[attn + "o_proj.bias"] = state[src + "self_attention.linear_proj.bias"]
            gate_b, up_b = state[src + "mlp.linear_fc1.bias"].chunk(2)
            out.update({mlp + "gate_proj.bias": gate_b, mlp + "up_proj.bias": up_b,
                        mlp + "down_proj.bias": state[src + "mlp.linear_fc2.bias"]})
    return hf_config, {k: v.contiguous() for k, v in out.items()}


def outer_weights(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The embedding, final norm and (untied) output head under the Llama family's names
    (Llama, Mistral, Qwen2 and Mixtral share them)."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    return out
