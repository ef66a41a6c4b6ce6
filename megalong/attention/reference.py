"""Naive O(L^2) attention with an explicit mask: the reference every attention kind is tested against.

Written for obviousness, not speed; use it on small shapes (and in float64 in tests).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def explicit_mask(length: int, visible: Callable[[int, int], bool]) -> torch.Tensor:
    """[length, length] boolean mask, True where query i may see key j, built element by element."""
    return torch.tensor([[visible(i, j) for j in range(length)] for i in range(length)])


def causal_mask(length: int) -> torch.Tensor:
    return explicit_mask(length, lambda i, j: j <= i)


def sliding_window_mask(length: int, window: int) -> torch.Tensor:
    return explicit_mask(length, lambda i, j: j <= i and i - j < window)


def alibi_bias_matrix(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """[heads, L, L] with entry -slope_h * (i - j), written out element by element."""
    return torch.tensor([[[-float(s) * (i - j) for j in range(length)] for i in range(length)]
                         for s in slopes], dtype=torch.float64)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for q, k, v of shape [batch, heads, L, head_dim]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
