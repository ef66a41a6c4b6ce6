"""`global`: full causal attention through PyTorch SDPA (flash/efficient kernels where available)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megalong.attention.alibi import alibi_bias
from megalong.attention import context_attention
from megalong.attention.base import CoreAttention
from megalong.attention.segments import same_document
from megalong.kernels import select as kernels


@kernels.eager
def alibi_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 slopes: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention (with ALiBi unless slopes is None, within documents with segment_ids) on
    the windowed kernel (no window): no L x L bias or mask tensor."""
    from megalong.kernels.window_attention import window_attention

    return window_attention(q, k, v, scale, None, 1, slopes, segment_ids=segment_ids)[0]


class GlobalAttention(CoreAttention):
    kv_cache = True  # generation keeps every key and value
    # SDPA indexes key/value groups itself (enable_gqa), and so does the windowed Triton kernel
    # (ALiBi or documents on CUDA).
    grouped_kv = True
    grouped_context = True  # attend_context too: the context exchanges carry the groups

    def cache_visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return k_pos[None, :] <= q_pos[:, None]

    def cache_keep(self, k_pos: torch.Tensor, next_pos: int) -> torch.Tensor:
        return torch.ones_like(k_pos, dtype=torch.bool)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.alibi:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.active_dropout, is_causal=True,
                                                  scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
        if kernels.use_kernels(q, dropout=self.active_dropout):  # ALiBi without an L x L bias
            return alibi_kernel(q, k, v, self.scale, self.alibi_slopes(q.device, torch.float32))
        L = q.shape[2]
        pos = torch.arange(L, device=q.device)
        distance = pos[:, None] - pos[None, :]
        bias = alibi_bias(self.alibi_slopes(q.device, q.dtype), distance)
        # [1, heads, L, L]: torch.compile's CPU lowering of SDPA misreads a 3-D mask
        bias = bias.masked_fill(distance < 0, float("-inf"))[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.active_dropout,
                                              scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])

    def attend_documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor) -> torch.Tensor:
        """Document-causal attention: a query sees the earlier keys of its own document. On the
        windowed kernel where kernels run (key tiles of earlier documents skipped), else torch SDPA
        with a [b, 1, L, L] mask built here, on the device."""
        if kernels.use_kernels(q, dropout=self.active_dropout):
            slopes = self.alibi_slopes(q.device, torch.float32) if self.alibi else None
            return alibi_kernel(q, k, v, self.scale, slopes, segment_ids)
        L = q.shape[2]
        pos = torch.arange(L, device=q.device)
        distance = pos[:, None] - pos[None, :]
        visible = ((distance >= 0) & same_document(segment_ids, segment_ids)).unsqueeze(1)
        mask: torch.Tensor = visible
        if self.alibi:
            bias = alibi_bias(self.alibi_slopes(q.device, q.dtype), distance)[None]
            mask = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.active_dropout,
                                              scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """All keys and values gathered from the context-parallel ranks (context_attention.py)."""
        slopes = self.alibi_slopes(q.device, q.dtype) if self.alibi else None
        return context_attention.global_attention(q, k, v, self.scale, slopes, self.active_dropout, segment_ids)
