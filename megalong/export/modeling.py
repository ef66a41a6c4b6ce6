"""megalong models as Hugging Face models: `MegalongConfig` / `MegalongForCausalLM`, registered
with transformers' Auto classes, for the models GPT-Neo and Mixtral cannot express.

The module tree mirrors megatron-core's parameter names, so an exported state dict is megalong's
merged state dict as it is, and the attention and MoE modules are megalong's own, run without
process groups: the Hugging Face model computes what megalong computes.

Kinds whose registry entry replaces megatron's SelfAttention or TransformerLayer have a
counterpart here, found by that class (`HF_SELF_ATTENTION`, `HF_LAYER`), never by the kind's name.

Generation keeps a `MegalongCache`: per layer, whatever the layer's attention keeps between steps
(`CoreAttention.decode`: a key/value cache for global and local layers, the recurrent state of
linear layers, the context's q/k/v otherwise); a layer class with no incremental form
(`incremental = False`, e.g. fam) keeps its inputs and is run again on the whole context.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from megalong.attention.fam import FamTransformerLayer, fam_block_context, run_fam_layer
from megalong.attention.local import LocalSelfAttention
from megalong.attention.lsh import LshSelfAttention
from megalong.attention.registry import ATTENTION_KINDS, CORE_ATTENTION
from megalong.config import Config, config_from_dict, migrate_saved_config
from megalong.moe.layer import MoELayer


class MegalongConfig(PretrainedConfig):
    model_type = "megalong"

    def __init__(self, megalong_model: Optional[dict] = None, vocab_size: int = 0, **kwargs):
        self.megalong_model = megalong_model or {}
        self.vocab_size = vocab_size
        model = self.megalong_model
        self.hidden_size = model.get("hidden_size", 0)
        self.num_hidden_layers = model.get("num_layers", 0)
        self.num_attention_heads = model.get("num_attention_heads", 0)
        kwargs.setdefault("tie_word_embeddings", model.get("tie_embeddings", True))
        super().__init__(**kwargs)

    def megalong_config(self) -> Config:
        return config_from_dict(migrate_saved_config({"model": self.megalong_model}))


def _activation(name: str):
    return {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "swiglu": F.silu}[name]


def _norm(cfg: Config) -> nn.Module:
    m = cfg.model
    return (nn.RMSNorm if m.normalization == "RMSNorm" else nn.LayerNorm)(m.hidden_size, eps=m.layernorm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """megatron's SelfAttention: fused q/k/v projection (per head [q; k; v]), RoPE, the kind's core
    attention, output projection. Subclasses for replaced SelfAttention classes change `project`."""

    qkv_parts = 3

    def __init__(self, cfg: Config, kind: str, layer_number: int):
        super().__init__()
        m = cfg.model
        self.heads, self.head_dim = m.num_attention_heads, m.hidden_size // m.num_attention_heads
        self.rope_base = m.rotary_base if m.position_embedding == "rope" else None
        self.linear_qkv = nn.Linear(m.hidden_size, self.qkv_parts * m.hidden_size, bias=m.qkv_bias)
        self.linear_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.linear_bias)
        core_config = SimpleNamespace(num_attention_heads=m.num_attention_heads, kv_channels=self.head_dim,
                                      hidden_size=m.hidden_size, attention_dropout=0.0)
        self.core_attention = CORE_ATTENTION[kind](
            core_config, layer_number, softmax_scale=None if m.scale_attention else 1.0, alibi=m.alibi,
            pg_collection=SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1)),
            options=cfg.attention_options(kind))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [s, b, hidden] -> q, k, v [s, b, heads, head_dim] (before RoPE)."""
        s, b, _ = x.shape
        return self.linear_qkv(x).view(s, b, self.heads, 3, self.head_dim).unbind(dim=3)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """megatron's non-interleaved rotary embedding on [s, b, heads, head_dim] at `positions` [s]."""
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                                          device=x.device) / self.head_dim))
        freqs = torch.outer(positions.to(torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        return (x.float() * emb.cos() + _rotate_half(x.float()) * emb.sin()).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: Optional[dict] = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """x [s, b, hidden] at `positions` [s]; with use_cache, the core attention's `decode` state
        (of the tokens before x) is used and the updated one returned."""
        s, b, _ = x.shape
        q, k, v = self.project(x)
        if self.rope_base is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if not use_cache:
            return self.linear_proj(self.core_attention(q.contiguous(), k.contiguous(), v.contiguous())), None
        ctx, state = self.core_attention.decode(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), state)
        return self.linear_proj(ctx.permute(2, 0, 1, 3).reshape(s, b, -1)), state


class GlobalTokensAttention(Attention):
    """`LocalSelfAttention`: with global tokens, Longformer's second projection `linear_qkv_global`,
    whose heads follow the local heads into the core attention."""

    def __init__(self, cfg: Config, kind: str, layer_number: int):
        super().__init__(cfg, kind, layer_number)
        if cfg.attention_options(kind).global_tokens:
            m = cfg.model
            self.linear_qkv_global = nn.Linear(m.hidden_size, 3 * m.hidden_size, bias=m.qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local = super().project(x)
        if not hasattr(self, "linear_qkv_global"):
            return local
        s, b, _ = x.shape
        extra = self.linear_qkv_global(x).view(s, b, self.heads, 3, self.head_dim).unbind(dim=3)
        return tuple(torch.cat([a, g], dim=2) for a, g in zip(local, extra))


class SharedQKAttention(Attention):
    """`LshSelfAttention`: `linear_qkv` projects per head [q; v]; the key is the query."""

    qkv_parts = 2

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, b, _ = x.shape
        q, v = self.linear_qkv(x).view(s, b, self.heads, 2, self.head_dim).unbind(dim=3)
        return q, q, v


class DenseMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.gated = m.gated_mlp
        self.activation = _activation(m.activation)
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


# Hugging Face counterparts of the classes a registry entry may name (see registry.AttentionKind).
HF_SELF_ATTENTION: dict[type, type[Attention]] = {
    SelfAttention: Attention,
    LocalSelfAttention: GlobalTokensAttention,
    LshSelfAttention: SharedQKAttention,
}


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
        self.input_layernorm, self.pre_mlp_layernorm = _norm(cfg), _norm(cfg)
        self.self_attention = hf_counterpart(ATTENTION_KINDS[kind].self_attention, HF_SELF_ATTENTION)(
            cfg, kind, layer_number)
        self.prefix_stable = self.self_attention.core_attention.prefix_stable
        if mlp_kind == "moe":
            moe_config = SimpleNamespace(hidden_size=m.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                                         gated_linear_unit=m.gated_mlp, init_method_std=m.init_std,
                                         num_layers=m.num_layers, activation_func=_activation(m.activation))
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
            "(add one to HF_SELF_ATTENTION or HF_LAYER in megalong/export/modeling.py)")


def export_refusal(cfg: Config) -> Optional[str]:
    """Why a layer of this model has no Hugging Face form here (None when every layer has one)."""
    for i, kind in enumerate(cfg.layer_kinds()):
        entry = ATTENTION_KINDS[kind]
        for cls, table in ((entry.self_attention, HF_SELF_ATTENTION), (entry.layer, HF_LAYER)):
            if cls not in table:
                return f"model.attention_layers: layer {i} is '{kind}', whose {missing_counterpart(cls)}"
    return None


class Embedding(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.word_embeddings = nn.Embedding(vocab_size, m.hidden_size)
        if m.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(m.max_position_embeddings, m.hidden_size)
        elif m.position_embedding == "axial":
            from megalong.model.axial_position import AxialPositionEmbedding

            self.position_embeddings = AxialPositionEmbedding(m.axial_position.shape, m.hidden_size,
                                                              m.axial_position.mode)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(positions)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            hf_counterpart(ATTENTION_KINDS[kind].layer, HF_LAYER)(cfg, kind, mlp, i + 1)
            for i, (kind, mlp) in enumerate(zip(cfg.layer_kinds(), cfg.mlp_kinds())))
        self.final_layernorm = _norm(cfg)

        # Generation keeps per-layer states up to the first layer that is not prefix-stable; from
        # there on it keeps that layer's inputs and reruns the rest of the stack on the context.
        self.first_unstable = next((i for i, layer in enumerate(self.layers) if not layer.prefix_stable),
                                   len(self.layers))
        # Reversible pairs (megalong/model/reversible.py): generation reruns the stack on the context.
        self.reversible_merge = cfg.model.reversible_merge if cfg.model.reversible else None
        if self.reversible_merge:
            self.first_unstable = 0

    def run_layers(self, layers, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`layers` on x without a cache: in turn, or as reversible pairs y1 = x1 + F(x2),
        y2 = x2 + G(y1) from x1 = x2 = x, merged as megalong's ReversibleTransformerBlock does."""
        if not self.reversible_merge:
            for layer in layers:
                x, _ = layer(x, positions)
            return x
        x1 = x2 = x / 2 if self.reversible_merge == "split" else x
        for layer in layers:
            if hasattr(layer, "reversible_attention"):  # fam: its FAM chain runs in the attention half
                x1 = x1 + layer.reversible_attention(x2)
            else:
                x1 = x1 + layer.self_attention(layer.input_layernorm(x2), positions, None, False)[0]
            out = layer.mlp(layer.pre_mlp_layernorm(x1))
            x2 = x2 + (out[0] if isinstance(out, tuple) else out)
        if self.reversible_merge == "mean":
            return (x1 + x2) / 2
        return x1 + x2 if self.reversible_merge == "split" else x2

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: Optional["MegalongCache"] = None) -> torch.Tensor:
        if cache is None:
            return self.final_layernorm(self.run_layers(self.layers, x, positions))
        first = self.first_unstable
        for i, layer in enumerate(self.layers[:first]):
            x, cache.layers[i] = layer(x, positions, cache.layers[i], use_cache=True)
        if first < len(self.layers):
            new = x.shape[0]
            kept = cache.layers[first]
            x = x if kept is None else torch.cat([kept["inputs"], x], dim=0)
            cache.layers[first] = {"inputs": x}
            whole = torch.arange(x.shape[0], device=x.device)
            x = self.run_layers(self.layers[first:], x, whole)[-new:]
        return self.final_layernorm(x)


class MegalongCache:
    """What generation keeps between steps: `seen` tokens so far and, per layer, its state."""

    def __init__(self, num_layers: int):
        self.layers: list[Optional[dict]] = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class MegalongForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegalongConfig
    base_model_prefix = "megalong"
    _no_split_modules = ["Layer"]

    def __init__(self, config: MegalongConfig):
        super().__init__(config)
        cfg = config.megalong_config()
        self.embedding = Embedding(cfg, config.vocab_size)
        self.decoder = Decoder(cfg)
        if not cfg.model.tie_embeddings:
            self.output_layer = nn.Linear(cfg.model.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: the model keeps a MegalongCache

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights always come from a megalong checkpoint

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values: Optional[MegalongCache] = None,
                use_cache: Optional[bool] = None, **unused) -> CausalLMOutputWithPast:
        """Logits of input_ids [b, s]; with a cache (`past_key_values`, or a new one when
        use_cache), input_ids are the tokens after the `cache.seen` already given."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MegalongForCausalLM: padded batches (zeros in attention_mask) are not supported")
        cache = past_key_values
        if cache is None and use_cache:
            cache = MegalongCache(len(self.decoder.layers))
        start = cache.seen if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids, positions).transpose(0, 1)  # megatron layout [s, b, h]
        x = self.decoder(x, positions, cache).transpose(0, 1)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        head = self.output_layer.weight if hasattr(self, "output_layer") else self.embedding.word_embeddings.weight
        logits = F.linear(x, head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: Optional[MegalongCache] = None,
                                      use_cache: Optional[bool] = None, **unused) -> dict:
        """With a cache only the tokens it has not seen; without, the whole context."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": use_cache}


AutoConfig.register("megalong", MegalongConfig, exist_ok=True)
AutoModelForCausalLM.register(MegalongConfig, MegalongForCausalLM, exist_ok=True)
