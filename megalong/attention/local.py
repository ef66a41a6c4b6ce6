"""`local`: causal sliding-window attention, in O(L * window) time and memory.

Query position i sees key positions j with i - window < j <= i (itself and the `window - 1`
tokens before it, as GPT-Neo's local layers). The sequence is cut into blocks of `window`
queries; each block attends to its own keys and the previous block's, so no L x L tensor exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalong.attention.alibi import alibi_bias
from megalong.attention.base import CoreAttention


class LocalAttention(CoreAttention):
    def __init__(self, *args, window: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, L, d = q.shape
        block = min(self.window, L)
        n = -(-L // block)
        pad = n * block - L

        def blocks(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0, 0, pad)).view(b, h, n, block, d)

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        # Keys of block t are those of block t-1 followed by its own; block -1 is all padding.
        kb = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :n], kb], dim=3)
        vb = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :n], vb], dim=3)

        q_pos = torch.arange(n * block, device=q.device).view(n, block, 1)
        k_pos = (torch.arange(n, device=q.device).view(n, 1, 1) - 1) * block + \
            torch.arange(2 * block, device=q.device).view(1, 1, 2 * block)
        distance = q_pos - k_pos  # [n, block, 2 * block]
        visible = (distance >= 0) & (distance < self.window) & (k_pos >= 0)

        if not self.alibi:
            mask = visible
        else:
            mask = alibi_bias(self.alibi_slopes(q.device, q.dtype), distance).unsqueeze(0)
            mask = mask.masked_fill(~visible, float("-inf"))  # [1, h, n, block, 2 * block]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask,
                                             dropout_p=self.active_dropout, scale=self.scale)
        return out.reshape(b, h, n * block, d)[:, :, :L]
