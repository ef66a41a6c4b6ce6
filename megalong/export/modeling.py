"""megalong models as Hugging Face models: `MegalongConfig` / `MegalongForCausalLM`, registered
with transformers' Auto classes, for the models GPT-Neo and Mixtral cannot express.

The module tree mirrors megatron-core's parameter names, so an exported state dict is megalong's
merged state dict as it is, and the attention and MoE modules are megalong's own, run without
process groups: the Hugging Face model computes what megalong computes. Generation recomputes the
whole context at each step (no KV cache yet).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from megalong.attention.registry import CORE_ATTENTION
from megalong.config import Config, config_from_dict
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
        return config_from_dict({"model": self.megalong_model})


def _activation(name: str):
    return {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "swiglu": F.silu}[name]


def _norm(cfg: Config) -> nn.Module:
    m = cfg.model
    return (nn.RMSNorm if m.normalization == "RMSNorm" else nn.LayerNorm)(m.hidden_size, eps=m.layernorm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config, kind: str, layer_number: int):
        super().__init__()
        m = cfg.model
        self.heads, self.head_dim = m.num_attention_heads, m.hidden_size // m.num_attention_heads
        self.rope_base = m.rotary_base if m.position_embedding == "rope" else None
        self.linear_qkv = nn.Linear(m.hidden_size, 3 * m.hidden_size, bias=m.qkv_bias)
        self.linear_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.linear_bias)
        core_config = SimpleNamespace(num_attention_heads=m.num_attention_heads, kv_channels=self.head_dim,
                                      hidden_size=m.hidden_size, attention_dropout=0.0)
        self.core_attention = CORE_ATTENTION[kind](
            core_config, layer_number, softmax_scale=None if m.scale_attention else 1.0, alibi=m.alibi,
            pg_collection=SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1)),
            **vars(cfg.attention_options(kind)))

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """megatron's non-interleaved rotary embedding on [s, b, heads, head_dim]."""
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                                          device=x.device) / self.head_dim))
        freqs = torch.outer(torch.arange(x.shape[0], dtype=torch.float32, device=x.device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        return (x.float() * emb.cos() + _rotate_half(x.float()) * emb.sin()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h]
        s, b, _ = x.shape
        q, k, v = self.linear_qkv(x).view(s, b, self.heads, 3, self.head_dim).unbind(dim=3)
        if self.rope_base is not None:
            q, k = self.rope(q), self.rope(k)
        return self.linear_proj(self.core_attention(q.contiguous(), k.contiguous(), v.contiguous()))


class DenseMLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.gated = m.activation == "swiglu"
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


class Layer(nn.Module):
    def __init__(self, cfg: Config, kind: str, mlp_kind: str, layer_number: int):
        super().__init__()
        m = cfg.model
        self.input_layernorm, self.pre_mlp_layernorm = _norm(cfg), _norm(cfg)
        self.self_attention = Attention(cfg, kind, layer_number)
        if mlp_kind == "moe":
            moe_config = SimpleNamespace(hidden_size=m.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                                         gated_linear_unit=m.activation == "swiglu", init_method_std=m.init_std,
                                         num_layers=m.num_layers, activation_func=_activation(m.activation))
            self.mlp = MoELayer(moe_config, options=dict(m.moe), ffn_hidden_size=cfg.ffn_hidden_size)
        else:
            self.mlp = DenseMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x))
        out = self.mlp(self.pre_mlp_layernorm(x))
        return x + (out[0] if isinstance(out, tuple) else out)


class Embedding(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.word_embeddings = nn.Embedding(vocab_size, m.hidden_size)
        if m.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(m.max_position_embeddings, m.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1], device=input_ids.device))
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg, kind, mlp, i + 1) for i, (kind, mlp)
                                    in enumerate(zip(cfg.layer_kinds(), cfg.mlp_kinds())))
        self.final_layernorm = _norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


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

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights always come from a megalong checkpoint

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **unused) -> CausalLMOutput:
        x = self.embedding(input_ids).transpose(0, 1)  # megatron layout [s, b, h]
        x = self.decoder(x).transpose(0, 1)
        head = self.output_layer.weight if hasattr(self, "output_layer") else self.embedding.word_embeddings.weight
        logits = F.linear(x, head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **unused) -> dict:
        return {"input_ids": input_ids}  # the whole context every step: no cache yet


AutoConfig.register("megalong", MegalongConfig, exist_ok=True)
AutoModelForCausalLM.register(MegalongConfig, MegalongForCausalLM, exist_ok=True)
