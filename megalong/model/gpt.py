"""Build megatron-core's GPTModel from a megalong config, and count its FLOPs."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megalong.checkpoint.names import tied_source
from megalong.config import Config, padded_vocab_size
from megalong.kernels import select as kernels
from megalong.model.context_rope import rotate_by_true_positions
from megalong.model.spec import decoder_spec
from megalong import compat

POSITION_EMBEDDING = {"learned": "learned_absolute", "rope": "rope", "none": "none", "axial": "none"}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def transformer_config(cfg: Config, whole: bool = False) -> TransformerConfig:
    """megatron-core's config; `whole`: for the whole model even where pipeline stages are used."""
    m, p = cfg.model, cfg.parallel
    staged = p.pipeline > 1 and not whole
    first_last = p.pipeline_layers if staged and p.pipeline_layers is not None else (None, None)
    activation = {"gelu_tanh": gelu_tanh, "gelu": F.gelu, "swiglu": F.silu}[m.activation]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=p.pipeline if staged else 1,
        virtual_pipeline_model_parallel_size=p.virtual_stages if staged and p.virtual_stages > 1 else None,
        num_layers_in_first_pipeline_stage=first_last[0],
        num_layers_in_last_pipeline_stage=first_last[1],
        pipeline_dtype=torch.float32,  # activations sent between stages (see train.pipeline)
        # Interleaved stages at PP=2 exchange activations and gradients both ways with the same
        # peer, same shapes. Batched p2p posts them in an order that matches them crosswise on
        # gloo (the wrong tensors arrive once a rank runs more micro-batches than stages); the
        # unbatched path sends the two directions over two process groups.
        batch_p2p_comm=False,
        layernorm_epsilon=m.layernorm_epsilon,
        normalization=m.normalization,
        add_bias_linear=m.linear_bias,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        activation_func=activation,
        gated_linear_unit=m.gated_mlp,
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
        recompute_granularity=cfg.execution.recompute_granularity,
        recompute_method=cfg.execution.recompute_method,
        recompute_num_layers=cfg.execution.recompute_num_layers,
    )


def build_model(cfg: Config, tokenizer_vocab_size: int, vp_stage: Optional[int] = None,
                whole: bool = False) -> GPTModel:
    """megatron-core GPTModel with megalong's per-layer spec, on the CPU, in float32: with
    pipeline stages (and not `whole`), the part of this rank's stage (model chunk `vp_stage`)."""
    m, e = cfg.model, cfg.execution
    kernels.set_mode(e.kernels)
    vocab = padded_vocab_size(m.vocab_size or tokenizer_vocab_size, m.make_vocab_size_divisible_by,
                              cfg.parallel.tensor)
    config = transformer_config(cfg, whole)
    compat.install()  # megatron-core without CUDA: bf16 autocast, recompute (nothing with CUDA)
    first = last = True
    if config.pipeline_model_parallel_size > 1:
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(cfg, config, vp_stage),
        pre_process=first,
        post_process=last,
        vp_stage=vp_stage,
        vocab_size=vocab,
        max_sequence_length=m.max_position_embeddings,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=POSITION_EMBEDDING[m.position_embedding],
        rotary_base=m.rotary_base,
    )
    if m.position_embedding == "rope":
        compat.keep_rotary_embedding_on_cpu(model.rotary_pos_emb)
        rotate_by_true_positions(model.rotary_pos_emb)
    if m.reversible or e.ffn_chunks > 1:
        from megalong.model.reversible import apply_memory_options

        apply_memory_options(model, cfg)
    if e.loss_chunks > 1 and model.post_process:
        from megalong.model.chunked_loss import attach_chunked_loss

        attach_chunked_loss(model, e.loss_chunks)
    if m.position_embedding == "axial" and model.pre_process:
        from megalong.model.axial_position import attach_axial_position_embedding

        attach_axial_position_embedding(model.embedding, m.axial_position.shape, m.axial_position.mode, m.init_std)
    return model


def build_model_chunks(cfg: Config, tokenizer_vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one, or `parallel.virtual_stages` with interleaving).

    With pipeline stages every rank first builds the whole model from the same seed and copies its
    stage's weights from it, so that any layout starts from the weights one process would have
    (a stage built alone would draw its layers' weights from the start of the random stream)."""
    if cfg.parallel.pipeline == 1:
        return [build_model(cfg, tokenizer_vocab_size)]
    state = torch.get_rng_state()
    whole = build_model(cfg, tokenizer_vocab_size, whole=True).state_dict()
    torch.set_rng_state(state)
    vp = cfg.parallel.virtual_stages
    chunks = [build_model(cfg, tokenizer_vocab_size, vp_stage=i if vp > 1 else None) for i in range(vp)]
    for chunk in chunks:
        chunk.load_state_dict(stage_state(whole, chunk), strict=True)
    return chunks


def layer_offset(model: GPTModel) -> int:
    """Global index of the first decoder layer of this model chunk."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config, model.vp_stage)


def to_global_names(state: dict, offset: int) -> dict:
    """`decoder.layers.<local>.` keys renamed to the whole model's layer index."""
    return {_shift_layer(k, offset): v for k, v in state.items()}


def stage_state(whole: dict, chunk: GPTModel) -> dict:
    """The entries of the whole model's state dict that `chunk` holds, under its own names."""
    offset, out = layer_offset(chunk), {}
    for name in chunk.state_dict():
        source = _shift_layer(name, offset)
        if source not in whole:  # tied: the last stage's copy
            source = tied_source(source, tied=True)
        out[name] = whole[source]
    return out


def _shift_layer(name: str, offset: int) -> str:
    prefix = "decoder.layers."
    if not name.startswith(prefix) or offset == 0:
        return name
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{int(index) + offset}.{rest}"


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def attended_keys(cfg: Config, kind: str) -> float:
    """Keys one query attends to on average (the attention FLOPs of a layer of this kind)."""
    return cfg.attention_options(kind).attended_keys(cfg.model_shape())


def model_flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counting attention pairs
    actually computed (a local layer attends to `window` keys, a global one to (L+1)/2 on average)
    and, in MoE layers, only the experts a token is routed to.
    """
    m = cfg.model
    h, f = m.hidden_size, cfg.ffn_hidden_size
    mlp_mats = 3 if m.gated_mlp else 2
    moe = cfg.moe_options()
    expert_f = moe.expert_hidden_size or f
    forward = 2 * h * vocab_size
    for kind, mlp in zip(cfg.layer_kinds(), cfg.mlp_kinds()):
        keys = attended_keys(cfg, kind)
        kv = 2 * h * m.query_groups // m.num_attention_heads  # key and value projections' width
        forward += 2 * (2 * h + kv) * h + 2 * 2 * h * keys  # projections; q k^T and p v
        if mlp == "moe":  # active parameters only: the chosen experts, shared experts, router
            active = (1 if moe.router == "switch" else moe.top_k) + moe.num_shared_experts
            forward += 2 * (mlp_mats * h * expert_f * active + h * moe.num_experts)
        else:
            forward += 2 * mlp_mats * h * f
    return 3.0 * forward
