"""The layers of megalong's Hugging Face model (megalong/export/modeling.py): megatron's
TransformerLayer (pre-norm attention and MLP), the FAM layer, the dense MLP and megalong's MoE
layer, with megatron's parameter names. `HF_LAYER` maps each megatron layer class a registry
entry may name to its counterpart here; `export_refusal` tells why a model has no such form."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megalong.attention.fam import FamTransformerLayer, fam_block_context, run_fam_layer
from megalong.attention.registry import ATTENTION_KINDS
from megalong.config import Config
from megalong.export.hf_attention import HF_SELF_ATTENTION
from megalong.moe.layer import MoELayer


def activation(name: str):
    """megatron's activation of `model.activation` (for swiglu: the gate's SiLU)."""
    return {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "swiglu": F.silu}[name]


def norm(cfg: Config) -> nn.Module:
    """The layer norm of `model.normalization`."""
    m = cfg.model
    return (nn.RMSNorm if m.normalization == "RMSNorm" else nn.LayerNorm)(m.hidden_size, eps=m.layernorm_epsilon)


class DenseMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.gated = m.gated_mlp
        self.activation = activation(m.activation)
        width = cfg.ffn_hidden_size * (2 if self.gated else 1)
        self.linear_fc1 = nn.Linear(m.hidden_size, width, bias=m.linear_bias)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, m.hidden_size, bias=m.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return self.linear_fc2(h)


class Layer(nn.Module):
    """megatron's TransformerLayer: pre-norm attention and MLP, each with a residual."""

    # False: generation keeps the layer's inputs and reruns it on the whole context.
    incremental = True
    # False: earlier tokens' outputs change as the context grows (lsh buckets, MoE capacity), so
    # generation reruns this layer and every later one on the whole context.
    prefix_stable = True

    def __init__(self, cfg: Config, kind: str, mlp_kind: str, layer_number: int):
        super().__init__()
        m = cfg.model
        self.input_layernorm, self.pre_mlp_layernorm = norm(cfg), norm(cfg)
        self.self_attention = hf_counterpart(ATTENTION_KINDS[kind].self_attention, HF_SELF_ATTENTION)(
            cfg, kind, layer_number)
        self.prefix_stable = self.self_attention.core_attention.prefix_stable
        if mlp_kind == "moe":
            moe_config = SimpleNamespace(hidden_size=m.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                                         gated_linear_unit=m.gated_mlp, init_method_std=m.init_std,
                                         num_layers=m.num_layers, activation_func=activation(m.activation))
            self.mlp = MoELayer(moe_config, options=m.moe, ffn_hidden_size=cfg.ffn_hidden_size)
            moe = cfg.moe_options()
            if not moe.dropless and moe.capacity_factor is not None:
                # Capacity is shared by the tokens of a forward pass: which tokens overflow depends
                # on the whole context, so earlier tokens' outputs change as the context grows.
                self.prefix_stable = False
        else:
            self.mlp = DenseMLP(cfg)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.pre_mlp_layernorm(x))
        return x + (out[0] if isinstance(out, tuple) else out)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: Optional[dict] = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """x [s, b, hidden] at `positions` [s] -> (output, the state generation keeps)."""
        if use_cache and not self.incremental:
            inputs = x if state is None else torch.cat([state["inputs"], x], dim=0)
            whole = torch.arange(inputs.shape[0], device=x.device)
            return self.forward(inputs, whole)[0][-x.shape[0]:], {"inputs": inputs}
        attended, state = self.self_attention(self.input_layernorm(x), positions, state, use_cache)
        return self.mlp_residual(x + attended), state


class FamLayer(Layer):
    """`FamTransformerLayer`: the same norms, projections and MLP run block by block with the
    layer's feedback memory, through fam.py's `run_fam_layer` (as megatron's layer does)."""

    incremental = False

    def __init__(self, cfg: Config, kind: str, mlp_kind: str, layer_number: int):
        super().__init__(cfg, kind, mlp_kind, layer_number)
        fam_length = self.self_attention.core_attention.fam_length
        self.fam_init = nn.Parameter(torch.empty(fam_length, cfg.model.hidden_size)) if fam_length else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: Optional[dict] = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        if use_cache:
            return super().forward(x, positions, state, use_cache)
        return run_fam_layer(x, self.fam_init, self.self_attention.core_attention, *self._fam_functions(),
                             self.mlp_residual), None

    def reversible_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention half of a reversible pair (megalong/model/reversible.py): the block
        tokens' projected attention, the FAM chain computed inside."""
        qkv, attention_residual = self._fam_functions()
        context = fam_block_context(x, self.fam_init, self.self_attention.core_attention, qkv,
                                    attention_residual, self.mlp_residual)
        return self.self_attention.linear_proj(context)

    def _fam_functions(self):
        attn = self.self_attention

        def qkv(h: torch.Tensor):
            return attn.project(self.input_layernorm(h))

        def attention_residual(context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return residual + attn.linear_proj(context)

        return qkv, attention_residual


HF_LAYER: dict[type, type[Layer]] = {
    TransformerLayer: Layer,
    FamTransformerLayer: FamLayer,
}


def hf_counterpart(megatron_class: type, table: dict[type, type]) -> type:
    """The Hugging Face class standing for `megatron_class` (a registry entry's SelfAttention or
    TransformerLayer class)."""
    if megatron_class not in table:
        raise NotImplementedError(missing_counterpart(megatron_class))
    return table[megatron_class]


def missing_counterpart(megatron_class: type) -> str:
    return (f"{megatron_class.__module__}.{megatron_class.__name__} has no Hugging Face counterpart "
            "(add one to HF_SELF_ATTENTION in megalong/export/hf_attention.py or HF_LAYER in megalong/export/hf_layers.py)")


def export_refusal(cfg: Config) -> Optional[str]:
    """Why a layer of this model has no Hugging Face form here (None when every layer has one)."""
    for i, kind in enumerate(cfg.layer_kinds()):
        entry = ATTENTION_KINDS[kind]
        for cls, table in ((entry.self_attention, HF_SELF_ATTENTION), (entry.layer, HF_LAYER)):
            if cls not in table:
                return f"model.attention_layers: layer {i} is '{kind}', whose {missing_counterpart(cls)}"
    return None
