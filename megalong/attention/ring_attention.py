"""Ring attention (Liu et al. 2023) over the context-parallel group: causal softmax attention of
this rank's queries over every rank's keys without ever holding more than two ranks' keys and
values.

The N ranks form a ring. Each of the N steps attends this rank's queries to the key/value block
it holds (its own first), merging the step's partial output into the running one by their
log-sum-exps (online softmax), while the block is already on its way to the next rank and the
previous rank's is arriving: (N - 1) x C x g x d x 2 values received per layer (g key/value
groups: h without grouped-query attention), the same as an all-gather, but never the whole
sequence in memory. Segment ids (packed documents) travel with
the blocks. A block is cut into its contiguous pieces (one per rank in the contiguous layout,
two in zig-zag, megalong/parallel/context.py), each cut into tiles of TILE positions; a pair
of query and key tiles that no causal pair links is skipped, and no C x C scores exist at once. Masks and ALiBi use the true positions.

The backward recomputes every pair's probabilities from the saved log-sum-exp (no N x C x C
tensor is kept) and sends the key/value blocks around the ring again, each with the gradient of
its keys and values accumulated by the ranks it visited: after N steps the gradient of a rank's
own keys and values is back at that rank (2N - 1 block messages in all).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megalong.attention.alibi import alibi_bias
from megalong.attention.grouped import stack_heads, stack_mask, unstack_heads
from megalong.attention.segments import same_document
from megalong.parallel.context import context_rank, context_size, rank_pieces
from megalong.parallel.context_p2p import ring_shift

Pieces = list[tuple[int, int, int]]  # (start in the sequence, start in the chunk, length)
TILE = 256  # scores are computed TILE x TILE at a time: memory O(C x d + TILE^2), not O(C^2)


def _pieces(rank: int, n: int, length: int) -> Pieces:
    """A rank's contiguous pieces cut into tiles of at most TILE positions."""
    out, offset = [], 0
    for start, size in rank_pieces(rank, n, length):
        for a in range(0, size, TILE):
            out.append((start + a, offset + a, min(TILE, size - a)))
        offset += size
    return out


def _pairs(q_pieces: Pieces, k_pieces: Pieces):
    """The (query piece, key piece) pairs some query of which sees some key causally."""
    for qp in q_pieces:
        for kp in k_pieces:
            if qp[0] + qp[2] - 1 >= kp[0]:
                yield qp, kp


def _scores(q: torch.Tensor, k: torch.Tensor, qp: tuple[int, int, int], kp: tuple[int, int, int],
            seg_q: Optional[torch.Tensor], seg_k: Optional[torch.Tensor], slopes: Optional[torch.Tensor],
            scale: float) -> torch.Tensor:
    """Masked (and ALiBi-biased) scores [b, g, j * m, n] of a query piece of q [b, h, C, d] against
    a key piece of k [b, g, C, d], a group's j query heads stacked along the rows (grouped.py)."""
    heads, groups = q.shape[1], k.shape[1]
    qs, ks = stack_heads(q.narrow(2, qp[1], qp[2]), groups), k.narrow(2, kp[1], kp[2])
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    distance = (qp[0] + torch.arange(qp[2], device=q.device))[:, None] - \
        (kp[0] + torch.arange(kp[2], device=q.device))[None, :]
    if slopes is not None:
        s = s + stack_mask(alibi_bias(slopes.to(s.dtype), distance), 4, heads, groups)
    visible = distance >= 0
    if seg_q is not None and seg_k is not None:
        same = same_document(seg_q.narrow(1, qp[1], qp[2]), seg_k.narrow(1, kp[1], kp[2]))
        visible = (visible & same).unsqueeze(1)
    return s.masked_fill(~stack_mask(visible, 4, heads, groups), float("-inf"))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x with -inf (rows that see nothing) as 0, for subtracting."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def _blocks(kv: torch.Tensor, seg: Optional[torch.Tensor], label: str):
    """(owner, key/value block, segment ids) for the N steps, each block sent on before it is used."""
    n, r = context_size(), context_rank()
    for step in range(n):
        pending = ring_shift(kv, label) if step < n - 1 else None
        seg_pending = ring_shift(seg, label) if pending is not None and seg is not None else None
        yield (r - step) % n, kv, seg
        if pending is not None:
            kv = pending.wait()[0]
            seg = seg_pending.wait()[0] if seg_pending is not None else None


class RingAttention(torch.autograd.Function):
    """q [b, h, C, d], k and v [b, g, C, d] (g key/value groups, query head i reading group
    i // (h / g)): the ring carries g heads, and a group's query heads are stacked along the rows
    of each tile's scores (no per-head copy of k or v)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Optional[torch.Tensor],
                slopes: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        n, r = context_size(), context_rank()
        heads = q.shape[1]
        length = q.shape[2] * n
        mine = _pieces(r, n, length)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype, device=q.device)
        for owner, kv, seg_k in _blocks(torch.stack([k, v]), seg, "global ring"):
            for qp, kp in _pairs(mine, _pieces(owner, n, length)):
                s = _scores(q, kv[0], qp, kp, seg, seg_k, slopes, scale)
                block_lse = torch.logsumexp(s, dim=-1, keepdim=True)
                p = torch.exp(s - _finite(block_lse))
                block_out = unstack_heads(torch.matmul(p, kv[1].narrow(2, kp[1], kp[2])), heads)
                block_lse = unstack_heads(block_lse, heads).squeeze(-1)
                rows = slice(qp[1], qp[1] + qp[2])
                old = lse[:, :, rows]
                new = torch.logaddexp(old, block_lse)
                safe = _finite(new)
                out[:, :, rows] = out[:, :, rows] * torch.exp(old - safe).unsqueeze(-1) + \
                    block_out * torch.exp(block_lse - safe).unsqueeze(-1)
                lse[:, :, rows] = new
        ctx.save_for_backward(q, k, v, seg, slopes, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        q, k, v, seg, slopes, out, lse = ctx.saved_tensors
        scale = ctx.scale
        n, r = context_size(), context_rank()
        heads, groups = q.shape[1], k.shape[1]
        length = q.shape[2] * n
        mine = _pieces(r, n, length)
        grad = grad.contiguous()
        delta = (grad * out).sum(dim=-1, keepdim=True)  # [b, h, C, 1]
        dq = torch.zeros_like(q)
        dkv = torch.zeros_like(torch.stack([k, v]))  # the gradient of the block being visited
        for step, (owner, kv, seg_k) in enumerate(_blocks(torch.stack([k, v]), seg, "global ring (backward)")):
            if step:  # the gradient of this block from the ranks it visited before
                dkv = ring_shift(dkv, "global ring (backward)").wait()[0]
            for qp, kp in _pairs(mine, _pieces(owner, n, length)):
                rows, cols = slice(qp[1], qp[1] + qp[2]), slice(kp[1], kp[1] + kp[2])
                s = _scores(q, kv[0], qp, kp, seg, seg_k, slopes, scale)
                p = torch.exp(s - stack_heads(lse[:, :, rows].unsqueeze(-1), groups))
                g = stack_heads(grad[:, :, rows], groups)
                dkv[1][:, :, cols] += torch.matmul(p.transpose(-1, -2), g)
                ds = p * (torch.matmul(g, kv[1][:, :, cols].transpose(-1, -2)) - stack_heads(delta[:, :, rows], groups))
                dq[:, :, rows] += unstack_heads(torch.matmul(ds, kv[0][:, :, cols]) * scale, heads)
                dkv[0][:, :, cols] += torch.matmul(ds.transpose(-1, -2), stack_heads(q[:, :, rows], groups)) * scale
        if n > 1:  # home: the gradient of this rank's own keys and values
            dkv = ring_shift(dkv, "global ring (backward)").wait()[0]
        return dq, dkv[0], dkv[1], None, None, None


@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   slopes: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Causal attention of this rank's queries [b, h, C, d] (positions by the context layout) over
    the keys and values [b, g, C, d] of every context rank (g key/value groups dividing h, g = h
    without grouped-query attention); ALiBi slopes [h]; segment_ids [b, C]."""
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    seg = None if segment_ids is None else segment_ids.contiguous()
    out = RingAttention.apply(q.to(work).contiguous(), k.to(work).contiguous(), v.to(work).contiguous(),
                              seg, slopes, scale)
    assert isinstance(out, torch.Tensor)
    return out.to(dtype)
