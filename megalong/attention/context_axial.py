"""`axial` attention across context-parallel ranks (megalong/parallel/context.py).

A rank's contiguous chunk of C tokens must hold whole rows (C a multiple of `cols`; other chunks
are refused: a row split over two ranks would need its summary from both). Then the row step and
the row summaries are local, and the column step of a query needs the keys k(r', c) and the
summaries u(r', c) of every earlier row r' (Ho et al.'s column context): both are all-gathered
over the context ranks ((N - 1) x C x (g + h) x d values received per layer, N ranks, the keys in
g key/value groups, the summaries per query head; the backward
reduce-scatters their gradients), the segment ids too with packed documents. The later rows'
keys arrive as well and are masked (an all-gather, not a prefix scan: the masked half costs the
column scores' R x R / 2 per column, as at one process). Per rank the column step's scores are
(C / cols) x R per column, 1/N of one process's; its keys and summaries are O(L).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megalong.parallel.context import all_gather, context_group, context_rank, gather_chunks

if TYPE_CHECKING:
    from megalong.attention.axial import AxialAttention


def axial_context(module: "AxialAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """`module.attend` on this rank's chunk (q [b, h, C, d], k and v [b, g, C, d]), the columns over
    every row."""
    C = q.shape[2]
    if C % module.cols:
        raise NotImplementedError(f"axial attention: parallel.context needs chunks of whole rows, "
                                  f"got a chunk of {C} tokens for model.attention.axial.axial_shape "
                                  f"cols {module.cols}")
    first = context_rank() * (C // module.cols)

    def columns(keys: torch.Tensor, summary: torch.Tensor, seg: Optional[torch.Tensor]):
        seg_all = None if seg is None else all_gather(seg, 2, context_group())
        return gather_chunks(keys, 2), gather_chunks(summary, 2), seg_all, first

    return module.attend(q, k, v, segment_ids, columns)
