"""The attention of megalong's Hugging Face model (megalong/export/modeling.py): megatron's
SelfAttention and the registry's replacements of it, with the same parameter names, around the
kind's own core attention (run without process groups). `HF_SELF_ATTENTION` maps each megatron
class a registry entry may name to its counterpart here."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from torch import nn

from megalong.attention.local import LocalSelfAttention
from megalong.attention.lsh import LshSelfAttention
from megalong.attention.registry import CORE_ATTENTION
from megalong.config import Config


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """megatron's SelfAttention: fused q/k/v projection (per head [q; k; v]), RoPE, the kind's core
    attention, output projection. Subclasses for replaced SelfAttention classes change `project`."""

    def __init__(self, cfg: Config, kind: str, layer_number: int):
        super().__init__()
        m = cfg.model
        self.heads, self.head_dim = m.num_attention_heads, m.hidden_size // m.num_attention_heads
        self.groups = m.query_groups
        self.rope_base = m.rotary_base if m.position_embedding == "rope" else None
        self.linear_qkv = nn.Linear(m.hidden_size, self.qkv_width(cfg), bias=m.qkv_bias)
        self.linear_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.linear_bias)
        core_config = SimpleNamespace(num_attention_heads=m.num_attention_heads, kv_channels=self.head_dim,
                                      hidden_size=m.hidden_size, attention_dropout=0.0)
        self.core_attention = CORE_ATTENTION[kind](
            core_config, layer_number, softmax_scale=None if m.scale_attention else 1.0, alibi=m.alibi,
            pg_collection=SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1)),
            options=cfg.attention_options(kind))

    def qkv_width(self, cfg: Config) -> int:
        """megatron's fused projection: per query group its query heads, one key and one value head."""
        return (self.heads + 2 * self.groups) * self.head_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [s, b, hidden] -> q [s, b, heads, head_dim], k and v [s, b, groups, head_dim] (before RoPE)."""
        return self.split(self.linear_qkv(x))

    def split(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, b, _ = mixed.shape
        per_group = self.heads // self.groups
        q, k, v = mixed.view(s, b, self.groups, per_group + 2, self.head_dim).split([per_group, 1, 1], dim=3)
        return q.reshape(s, b, self.heads, self.head_dim), k.squeeze(3), v.squeeze(3)

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
            self.linear_qkv_global = nn.Linear(m.hidden_size, self.qkv_width(cfg), bias=m.qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local = super().project(x)
        if not hasattr(self, "linear_qkv_global"):
            return local
        extra = self.split(self.linear_qkv_global(x))
        return tuple(torch.cat([a, g], dim=2) for a, g in zip(local, extra))


class SharedQKAttention(Attention):
    """`LshSelfAttention`: `linear_qkv` projects per head [q; v]; the key is the query."""

    def qkv_width(self, cfg: Config) -> int:
        return 2 * cfg.model.hidden_size  # config validation refuses groups with lsh

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, b, _ = x.shape
        q, v = self.linear_qkv(x).view(s, b, self.heads, 2, self.head_dim).unbind(dim=3)
        return q, q, v


# Hugging Face counterparts of the classes a registry entry may name (see registry.AttentionKind).
HF_SELF_ATTENTION: dict[type, type[Attention]] = {
    SelfAttention: Attention,
    LocalSelfAttention: GlobalTokensAttention,
    LshSelfAttention: SharedQKAttention,
}
