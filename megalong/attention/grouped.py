"""Grouped-query attention without copying keys and values per query head.

A kind whose `attend` indexes key/value groups (`CoreAttention.grouped_kv`) gets q [b, heads, ...]
and k, v [b, groups, ...], query head i reading group i // (heads / groups). The query heads of one
group see the same keys, so they are stacked along the query rows: q [b, heads, *rest, n, e]
becomes [b, groups, *rest, (heads / groups) * n, e], and every matmul against the group's k and v
is an ordinary batched one (no broadcast, which torch.matmul would materialise). Only tensors of
the queries' size (q, the output, scores) are rearranged; k and v are used as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def per_group(heads: int, groups: int) -> int:
    if groups <= 0 or heads % groups:
        raise ValueError(f"grouped attention: {groups} key/value groups do not divide {heads} query heads")
    return heads // groups


def stack_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, heads, *rest, n, e] -> [b, groups, *rest, (heads / groups) * n, e]: a group's query
    heads one after another along the rows (a copy unless there is one head per group)."""
    b, heads = x.shape[:2]
    j = per_group(heads, groups)
    if j == 1:
        return x
    x = x.reshape(b, groups, j, *x.shape[2:]).movedim(2, -3)
    return x.reshape(*x.shape[:-3], j * x.shape[-2], x.shape[-1])


def unstack_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `stack_heads`: [b, groups, *rest, j * n, e] -> [b, heads, *rest, n, e]."""
    b, groups = x.shape[:2]
    j = per_group(heads, groups)
    if j == 1:
        return x
    x = x.reshape(*x.shape[:-2], j, x.shape[-2] // j, x.shape[-1]).movedim(-3, 2)
    return x.reshape(b, heads, *x.shape[3:])


def stack_mask(mask: torch.Tensor, ndim: int, heads: int, groups: int) -> torch.Tensor:
    """A mask or bias [..., n, keys] that broadcasts against scores [b, heads, *rest, n, keys]
    (`ndim` dimensions; its head dimension 1 or `heads`) laid out like `stack_heads`' rows."""
    j = per_group(heads, groups)
    if j == 1:
        return mask
    mask = mask.reshape(*([1] * (ndim - mask.ndim)), *mask.shape)
    n, keys = mask.shape[-2:]
    if mask.shape[1] == 1:  # the same for every head: repeated along the stacked rows
        shape = list(mask.shape)
        expanded = mask.unsqueeze(-3).expand(*shape[:-2], j, n, keys)
        return expanded.reshape(*shape[:-2], j * n, keys)
    return stack_heads(mask, groups)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """torch SDPA on q [b, heads, *rest, n, e] and k, v [b, groups, *rest, m, e] (any number of
    dimensions, unlike SDPA's enable_gqa, whose CPU math path copies k and v per query head)."""
    heads, groups = q.shape[1], k.shape[1]
    if attn_mask is not None:
        attn_mask = stack_mask(attn_mask, q.ndim, heads, groups)
    out = F.scaled_dot_product_attention(stack_heads(q, groups), k, v, attn_mask=attn_mask,
                                         dropout_p=dropout_p, scale=scale)
    return unstack_heads(out, heads)
