"""Config -> megatron-core ModuleSpec for every layer: the one place that composes a layer.

Each layer is megatron's TransformerLayer with SelfAttention whose `core_attention` is the
megalong kind named for that layer in `model.attention_layers`, and megatron's MLP or megalong's
MoELayer as `model.mlp_layers` says.
"""
from __future__ import annotations

from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megalong.attention.registry import ATTENTION_KINDS, core_attention_spec
from megalong.config import Config
from megalong.model.linear import BiasFreeColumnParallelLinear


def norm_class() -> type:
    """apex's fused LayerNorm where apex and CUDA are present, torch's otherwise."""
    import torch

    if torch.cuda.is_available():
        try:
            import apex  # noqa: F401
            from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

            return FusedLayerNorm
        except ImportError:
            pass
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def mlp_spec(cfg: Config, mlp_kind: str) -> ModuleSpec:
    if mlp_kind == "moe":
        from megalong.moe.layer import MoELayer

        return ModuleSpec(module=MoELayer, params={"options": cfg.model.moe,
                                                   "ffn_hidden_size": cfg.ffn_hidden_size})
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def layer_spec(cfg: Config, kind: str, mlp_kind: str = "dense") -> ModuleSpec:
    norm = norm_class()
    m = cfg.model
    qkv_linear = BiasFreeColumnParallelLinear if (m.linear_bias and not m.qkv_bias) else ColumnParallelLinear
    entry = ATTENTION_KINDS[kind]
    attention = ModuleSpec(
        module=entry.self_attention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=qkv_linear,
            core_attention=core_attention_spec(kind, cfg.attention_options(kind), m.alibi),
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=entry.layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec(cfg, mlp_kind),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_spec(cfg: Config, config=None, vp_stage=None) -> TransformerBlockSubmodules:
    """Per-layer specs of the decoder: all layers, or with pipeline stages (megatron-core
    `TransformerConfig` `config` with pipeline_model_parallel_size > 1) the layers of this rank's
    stage (chunk `vp_stage` with virtual stages), which megatron takes as given."""
    layers = [layer_spec(cfg, kind, mlp) for kind, mlp in zip(cfg.layer_kinds(), cfg.mlp_kinds())]
    if config is not None and config.pipeline_model_parallel_size > 1:
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        offset = get_transformer_layer_offset(config, vp_stage)
        layers = layers[offset:offset + get_num_layers_to_build(config, vp_stage)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm_class())
