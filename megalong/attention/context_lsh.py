"""`lsh` attention across context-parallel ranks (megalong/parallel/context.py): an all-gather.

LSH buckets span the whole sequence (a token's chunk partners may sit on any rank), so every rank
all-gathers the queries and values of every chunk (2 x (N - 1) x C x h x d values received per
layer, N ranks of chunk C, h heads of width d; the backward reduce-scatters their gradients) and
the segment ids, runs the one-process attention on the whole sequence and keeps its chunk's
outputs. Exact: the rotations are drawn from (seed, layer, global head, round, buckets) alone
(lsh.py), the same on every rank, and the bucket count follows the whole length L. The cost is
that of one process per rank (O(L x bucket_size) compute and memory), not 1/N: the communication is
O(L), like ring attention's, and this layout gains nothing over CP=1 for this kind but a model
mixing it with kinds that do.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megalong.parallel.context import all_gather, context_group, context_rank, gather_chunks

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def gathered_attention(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """`attend(q, k, v, segment_ids)` on the whole sequence (every rank's chunk of q, k, v
    [b, h, C, d] and segment ids [b, C] gathered in rank order), this rank's chunk of the output.
    k is gathered only when it is not q itself (lsh shares queries and keys)."""
    C = q.shape[2]
    q_all = gather_chunks(q, 2)
    k_all = q_all if k is q else gather_chunks(k, 2)
    v_all = gather_chunks(v, 2)
    seg_all = None if segment_ids is None else all_gather(segment_ids, 1, context_group())
    start = context_rank() * C
    return attend(q_all, k_all, v_all, seg_all)[:, :, start:start + C]
