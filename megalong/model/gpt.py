"""Build megatron-core's GPTModel from a megalong config, and count its FLOPs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megalong.config import Config, padded_vocab_size
from megalong.model.spec import decoder_spec
from megalong.parallel.cpu_compat import keep_rotary_embedding_on_cpu

POSITION_EMBEDDING = {"learned": "learned_absolute", "rope": "rope", "none": "none"}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def transformer_config(cfg: Config) -> TransformerConfig:
    m = cfg.model
    activation = {"gelu_tanh": gelu_tanh, "gelu": F.gelu, "swiglu": F.silu}[m.activation]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=cfg.parallel.tensor,
        layernorm_epsilon=m.layernorm_epsilon,
        normalization=m.normalization,
        add_bias_linear=m.linear_bias,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        activation_func=activation,
        gated_linear_unit=m.activation == "swiglu",
        softmax_scale=None if m.scale_attention else 1.0,
        # Initialise the full weights on the CPU from one seed and slice them per rank, so that
        # any tensor-parallel size starts from the same model.
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_model(cfg: Config, tokenizer_vocab_size: int) -> GPTModel:
    """megatron-core GPTModel with megalong's per-layer spec, on the CPU, in float32."""
    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size or tokenizer_vocab_size, m.make_vocab_size_divisible_by,
                              cfg.parallel.tensor)
    model = GPTModel(
        config=transformer_config(cfg),
        transformer_layer_spec=decoder_spec(cfg),
        vocab_size=vocab,
        max_sequence_length=m.max_position_embeddings,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=POSITION_EMBEDDING[m.position_embedding],
        rotary_base=m.rotary_base,
    )
    if m.position_embedding == "rope":
        keep_rotary_embedding_on_cpu(model.rotary_pos_emb)
    return model


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def model_flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counting attention pairs
    actually computed (a local layer attends to `window` keys, a global one to (L+1)/2 on average)
    and, in MoE layers, only the experts a token is routed to.
    """
    m = cfg.model
    h, L, f = m.hidden_size, cfg.seq_length, cfg.ffn_hidden_size
    mlp_mats = 3 if m.activation == "swiglu" else 2
    moe = cfg.moe_options()
    expert_f = moe.expert_hidden_size or f
    forward = 2 * h * vocab_size
    for kind, mlp in zip(cfg.layer_kinds(), cfg.mlp_kinds()):
        keys = (L + 1) / 2 if kind == "global" else min(getattr(cfg.attention_options(kind), "window", L), L)
        forward += 2 * 4 * h * h + 2 * 2 * h * keys  # projections; q k^T and p v
        if mlp == "moe":  # active parameters only: the chosen experts, shared experts, router
            active = (1 if moe.router == "switch" else moe.top_k) + moe.num_shared_experts
            forward += 2 * (mlp_mats * h * expert_f * active + h * moe.num_experts)
        else:
            forward += 2 * mlp_mats * h * f
    return 3.0 * forward
