"""`global`: full causal attention through PyTorch SDPA (flash/efficient kernels where available)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalong.attention.alibi import alibi_bias
from megalong.attention.base import CoreAttention


class GlobalAttention(CoreAttention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.alibi:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout,
                                                  is_causal=True, scale=self.scale)
        L = q.shape[2]
        pos = torch.arange(L, device=q.device)
        distance = pos[:, None] - pos[None, :]
        bias = alibi_bias(self.alibi_slopes(q.device, q.dtype), distance)
        bias = bias.masked_fill(distance < 0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=self.active_dropout, scale=self.scale)
