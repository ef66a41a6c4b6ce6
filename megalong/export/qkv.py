"""megatron's fused q/k/v projection and separate q, k, v projections, both ways.

megatron lays `linear_qkv` (weight [(heads + 2 * groups) * head_dim, hidden], bias likewise) out
per query group: the group's heads_per_group query heads, then its key head, then its value head.
With one group per head that is [q; k; v] per head."""
from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """q [heads * d, ...], k and v [groups * d, ...] -> megatron's fused tensor (weight or bias)."""
    per_group = heads // groups
    rest = q.shape[1:]
    qg = q.reshape(groups, per_group, -1, *rest)
    kg = k.reshape(groups, 1, -1, *rest)
    vg = v.reshape(groups, 1, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def split_qkv(fused: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv: (q [heads * d, ...], k [groups * d, ...], v [groups * d, ...])."""
    per_group = heads // groups
    rest = fused.shape[1:]
    g = fused.reshape(groups, per_group + 2, -1, *rest)
    q = g[:, :per_group].reshape(-1, *rest).contiguous()
    k = g[:, per_group].reshape(-1, *rest).contiguous()
    v = g[:, per_group + 1].reshape(-1, *rest).contiguous()
    return q, k, v
