"""Attention across context-parallel ranks (megalong/parallel/context.py): each rank holds the
queries, keys and values of its contiguous chunk [start, start + C) of the sequence and
computes the outputs of its own queries, exactly as one process would. Per kind, what crosses
ranks (N ranks, chunk C, h heads of width d):

- `global`: every rank's keys and values (and segment ids) all-gathered, 2 x (N - 1) x C x h x d
  values received per layer; the backward reduce-scatters their gradients. An all-gather, not yet
  a ring (the L x C scores of a rank are computed at once). Causal masks and ALiBi use the true
  positions (the chunk's start added to the queries').
- `local`: a halo: the last min(halo, C) keys and values of every rank all-gathered, halo =
  (window - 1) x the largest dilation; a rank keeps the `halo` positions before its chunk (those of
  several earlier ranks when the window is longer than a chunk) and runs the kind's own attention
  on halo + chunk. Independent of L. Global tokens are refused.
- `linear` (elu): an exclusive scan of the per-chunk states S = sum phi(k) v^T [h, d, d] and
  z = sum phi(k) [h, d]: all-gathered (N x h x d x (d + 1) values), a rank adds those of the ranks
  before it. Independent of L. `efficient` is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megalong.attention.alibi import alibi_bias
from megalong.attention.segments import same_document
from megalong.kernels.linear_reference import causal_linear_attention, elu_feature_map
from megalong.parallel.context import context_group, context_rank, gather_chunks, all_gather


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     slopes: Optional[torch.Tensor], dropout: float,
                     segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of this rank's queries [b, h, C, d] over the keys of every rank."""
    C = q.shape[2]
    start = context_rank() * C
    k_all, v_all = gather_chunks(k, 2), gather_chunks(v, 2)
    L = k_all.shape[2]
    distance = (start + torch.arange(C, device=q.device))[:, None] - torch.arange(L, device=q.device)[None, :]
    visible = distance >= 0
    if segment_ids is not None:
        seg_all = all_gather(segment_ids, 1, context_group())
        visible = (visible & same_document(segment_ids, seg_all)).unsqueeze(1)  # [b, 1, C, L]
    mask: torch.Tensor = visible
    if slopes is not None:
        bias = alibi_bias(slopes, distance)
        mask = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        if mask.dim() == 3:
            mask = mask[None]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout, scale=scale)


def with_halo(x: torch.Tensor, halo: int, dim: int, differentiable: bool = True) -> tuple[torch.Tensor, int]:
    """(`x` with the `halo` positions before this rank's chunk prepended along `dim` (fewer near
    the sequence start), how many were prepended)."""
    C = x.shape[dim]
    r = context_rank()
    need = min(halo, r * C)
    tail = min(halo, C)
    last = x.narrow(dim, C - tail, tail)
    tails = gather_chunks(last, dim) if differentiable else all_gather(last, dim, context_group())
    before = tails.narrow(dim, r * tail - need, need)
    return torch.cat([before, x], dim=dim), need


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                     chunk_size: int) -> torch.Tensor:
    """Katharopoulos's causal linear attention on this rank's chunk, starting from the summed
    states of the ranks before it (an exclusive scan over the all-gathered chunk states)."""
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    S = torch.matmul(fk.transpose(-1, -2), v)  # [b, h, d, e]
    z = fk.sum(dim=2)  # [b, h, d]
    d = fk.shape[-1]
    state = torch.cat([S, z.unsqueeze(-1)], dim=-1).unsqueeze(2)  # [b, h, 1, d, e + 1]
    states = gather_chunks(state, 2)
    before = states[:, :, :context_rank()].sum(dim=2)
    initial = (before[..., :-1], before[..., -1].reshape(*before.shape[:2], d))
    return causal_linear_attention(fq, fk, v, eps, chunk_size, initial)
