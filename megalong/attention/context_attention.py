"""Attention across context-parallel ranks (megalong/parallel/context.py): each rank holds the
queries, keys and values of its chunk of the sequence (contiguous [start, start + C), or the two
zig-zag pieces for global-only models) and computes the outputs of its own queries, exactly as one
process would. Per kind, what crosses ranks per layer (N ranks, chunk C, h heads of width d;
every message counted in megalong/parallel/comm_bytes.py). With grouped-query attention the keys,
values and states cross with one head per key/value group (`CoreAttention.grouped_context`):
read h as the number of groups for them.

- `global`: ring attention (ring_attention.py): the keys and values (and segment ids) passed
  around the ring point-to-point, (N - 1) x 2 x C x h x d values received in the forward, 2N - 1
  such blocks in the backward (the blocks again, with their gradients); never more than two
  blocks in memory. Either layout; zig-zag balances the causal work. Causal masks and ALiBi use
  the true positions. No attention dropout.
- `local`: a halo, point-to-point: the `halo` = (window - 1) x the largest dilation positions
  before a chunk, from the previous rank (or ranks, when the window is longer than a chunk),
  2 x halo x h x d values received, its gradient sent back in the backward; the kind's own
  attention then runs on halo + chunk. Independent of L and N. Global tokens (G of them): their
  ordinary keys and values and their queries gathered (zeros from the ranks not holding them,
  N x G x h x d each), their rows attended by every rank to its own chunk and the partial outputs
  and log-sum-exps gathered (N x G x h x (d + 1)) and merged.
- `linear` (elu): an exclusive scan of the per-chunk states S = sum phi(k) v^T [h, d, d] and
  z = sum phi(k) [h, d]: all-gathered (N x h x d x (d + 1) values), a rank adds those of the ranks
  before it. With packed documents, each rank's state of its last document and its
  last segment id, likewise. Independent of L. `efficient`: the chunk states (with their
  per-feature maxima) likewise, N x h x d x (d + 2) values; not with packed documents.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalong.attention.alibi import alibi_bias
from megalong.attention.grouped import stack_heads, stack_mask, unstack_heads
from megalong.attention.segments import same_document
from megalong.attention.linear_documents import segmented_efficient_attention, segmented_linear_attention
from megalong.kernels.linear_reference import causal_linear_attention, elu_feature_map
from megalong.attention.ring_attention import ring_attention
from megalong.parallel.context import context_rank, gather_chunks, layout
from megalong.parallel.context_p2p import halo_before


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     slopes: Optional[torch.Tensor], dropout: float,
                     segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of this rank's queries [b, h, C, d] over the keys of every rank: ring
    attention (ring_attention.py), in either context layout."""
    if dropout > 0:
        raise NotImplementedError("global attention with parallel.context > 1: ring attention has no "
                                  "attention dropout (model.attention_dropout must be 0)")
    return ring_attention(q, k, v, scale, slopes, segment_ids)


def contiguous_only(kind: str) -> None:
    if layout() != "contiguous":
        raise NotImplementedError(f"{kind} attention with parallel.context > 1 needs parallel.context_layout: "
                                  "contiguous")


def with_halo(x: torch.Tensor, halo: int, dim: int, differentiable: bool = True) -> tuple[torch.Tensor, int]:
    """(`x` with the `halo` positions before this rank's chunk prepended along `dim` (fewer near
    the sequence start), received point-to-point from the previous rank(s); how many were
    prepended)."""
    contiguous_only("local")
    before = halo_before(x if differentiable else x.detach(), halo, dim, "local halo")
    return torch.cat([before, x], dim=dim), before.shape[dim]


def gather_global_rows(x: torch.Tensor, positions: list[int], dim: int) -> torch.Tensor:
    """`x` at the sequence positions `positions` (all of them, whichever rank holds them),
    differentiable: each rank contributes its own rows, the others are zeros, summed over the
    ranks ([N, ...] gathered, |positions| rows each)."""
    C, r = x.shape[dim], context_rank()
    index = torch.tensor([p - r * C if r * C <= p < (r + 1) * C else 0 for p in positions], device=x.device)
    owned = torch.tensor([r * C <= p < (r + 1) * C for p in positions], device=x.device)
    rows = x.index_select(dim, index)
    shape = [1] * rows.dim()
    shape[dim] = len(positions)
    rows = rows * owned.view(shape).to(rows.dtype)
    return gather_chunks(rows.unsqueeze(0), 0, "local global tokens").sum(dim=0)


def global_token_rows(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, positions: list[int],
                      scale: float, slopes: Optional[torch.Tensor],
                      segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The outputs [b, h, |G|, d] of the global tokens at `positions` (every rank gets all of them):
    their queries all-gathered, attended by each rank to its own chunk's global-projection keys
    (partial outputs and log-sum-exps), those gathered and merged by log-sum-exp. kg, vg may hold
    key/value groups (grouped.py: a group's query heads stacked along the rows)."""
    C, r = kg.shape[2], context_rank()
    heads, groups = qg.shape[1], kg.shape[1]
    q_rows = gather_global_rows(qg, positions, 2)  # [b, h, G, d]
    g = torch.tensor(positions, device=qg.device)
    distance = g[:, None] - (r * C + torch.arange(C, device=qg.device))[None, :]  # [G, C]
    s = torch.matmul(stack_heads(q_rows, groups), kg.transpose(-1, -2)) * scale  # [b, g, j * G, C]
    if slopes is not None:
        s = s + stack_mask(alibi_bias(slopes.to(s.dtype), distance), 4, heads, groups)
    visible = distance >= 0
    if segment_ids is not None:
        seg_g = gather_global_rows(segment_ids, positions, 1)
        visible = (visible & same_document(seg_g, segment_ids)).unsqueeze(1)
    s = s.masked_fill(~stack_mask(visible, 4, heads, groups), float("-inf"))
    top = s.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    e = torch.exp(s - top)
    total = e.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(total.dtype).tiny
    out = unstack_heads(torch.matmul(e, vg) / total.clamp_min(tiny), heads)
    lse = torch.where(total > 0, torch.log(total.clamp_min(tiny)) + top, torch.full_like(top, float("-inf")))
    lse = unstack_heads(lse, heads)
    parts = gather_chunks(torch.cat([out, lse], dim=-1).unsqueeze(0), 0, "local global tokens")
    outs, lses = parts[..., :-1], parts[..., -1:]
    weights = torch.softmax(lses, dim=0)  # every global token sees itself: some part is finite
    return (weights * outs).sum(dim=0)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                     chunk_size: int) -> torch.Tensor:
    """Katharopoulos's causal linear attention on this rank's chunk, starting from the summed
    states of the ranks before it (an exclusive scan over the all-gathered chunk states)."""
    contiguous_only("linear")
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    S = torch.matmul(fk.transpose(-1, -2), v)  # [b, h, d, e]
    z = fk.sum(dim=2)  # [b, h, d]
    d = fk.shape[-1]
    state = torch.cat([S, z.unsqueeze(-1)], dim=-1).unsqueeze(2)  # [b, h, 1, d, e + 1]
    states = gather_chunks(state, 2, "linear states")
    before = states[:, :, :context_rank()].sum(dim=2)
    initial = (before[..., :-1], before[..., -1].reshape(*before.shape[:2], d))
    return causal_linear_attention(fq, fk, v, eps, chunk_size, initial)


def continued_document(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(before [b]: the segment id of the position just before this rank's chunk, -1 on rank 0;
    joins [b, N]: the ranks j < r whose chunk ends in that document). Segment ids increase along
    the sequence, so every rank between such a j and this one lies wholly inside the document:
    the state entering this rank is the sum of the joining ranks' last-document states. The last
    segment ids are all-gathered (N values per sample)."""
    last = segment_ids[:, -1]  # [b]
    lasts = gather_chunks(last[:, None].contiguous(), 1, "linear states")  # [b, N]
    r = context_rank()
    before = lasts[:, r - 1] if r else torch.full_like(last, -1)  # [b]; -1: no document before
    joins = torch.zeros_like(lasts, dtype=torch.bool)
    joins[:, :r] = lasts[:, :r] == before[:, None]
    return before, joins


def linear_documents_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                               eps: float, chunk_size: int) -> torch.Tensor:
    """Causal linear attention (elu) with packed documents on this rank's chunk. Each rank's
    state of its last document (S, z over the positions of the chunk's last segment id) is
    all-gathered; the state entering rank r sums those of the ranks that continue the document
    rank r - 1 ends with (`continued_document`), and it carries on to the tokens of that document
    only."""
    contiguous_only("linear")
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    b, h, _, d = fk.shape
    before, joins = continued_document(segment_ids)
    in_last = (segment_ids == segment_ids[:, -1:]).to(fk.dtype)[:, None, :, None]  # [b, 1, C, 1]
    tail_k = fk * in_last
    state = torch.cat([torch.matmul(tail_k.transpose(-1, -2), v), tail_k.sum(dim=2).unsqueeze(-1)], dim=-1)
    states = gather_chunks(state.unsqueeze(2), 2, "linear states")  # [b, h, N, d, e + 1]
    # Rank 0 too takes the (empty) sum, so that every rank's backward runs the same collectives.
    summed = (states * joins.to(fk.dtype)[:, None, :, None, None]).sum(dim=2)
    initial = (summed[..., :-1], summed[..., -1].reshape(b, h, d), before)
    return segmented_linear_attention(fq, fk, v, segment_ids, eps, chunk_size, initial)


def efficient_chunk_states(k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every rank's state of Shen et al.'s efficient attention over its chunk (or over the positions
    `keep` [b, 1, C, 1] of it), all-gathered: [b, h, N, d, e + 2], the sums of exp(k - m) v^T and
    exp(k - m), and m, the per-feature maximum of those keys (N x h x d x (e + 2) values)."""
    kd = k.detach() if keep is None else k.detach().masked_fill(~keep, float("-inf"))
    m = kd.amax(dim=2)  # [b, h, d]: finite (the chunk's last token is always kept)
    e = k - m.unsqueeze(2)
    w = torch.exp(e if keep is None else e.masked_fill(~keep, float("-inf")))  # 0 off `keep`
    state = torch.cat([torch.matmul(w.transpose(-1, -2), v), w.sum(dim=2).unsqueeze(-1), m.unsqueeze(-1)], dim=-1)
    return gather_chunks(state.unsqueeze(2), 2, "linear states")


def rescaled_sum(states: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N [b, h, d, e], D [b, h, d], m [b, h, d]) of the `ranks` (a mask broadcasting to [b, h, N, d])
    of `efficient_chunk_states`, each rescaled to their largest m and summed (m -inf, sums 0, for
    none: every rank takes the same steps, rank 0 an empty sum)."""
    ms = torch.where(ranks, states[..., -1].detach(), torch.full_like(states[..., -1], float("-inf")))
    top = ms.amax(dim=2)  # [b, h, d]
    safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    scale = torch.where(ranks, torch.exp(ms - safe.unsqueeze(2)), torch.zeros_like(ms))  # [b, h, N, d]
    summed = (states[..., :-1] * scale.unsqueeze(-1)).sum(dim=2)
    return summed[..., :-1], summed[..., -1], top


def efficient_state_before(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shen et al.'s efficient attention: the state (N [b, h, d, e], D [b, h, d], m [b, h, d]) of
    the positions before this rank's chunk, as linear.efficient_chunk carries it: the earlier
    ranks' chunk states, rescaled to their largest m and summed."""
    contiguous_only("linear")
    states = efficient_chunk_states(k, v)
    earlier = (torch.arange(states.shape[2], device=k.device) < context_rank()).view(1, 1, -1, 1)
    return rescaled_sum(states, earlier)


def efficient_documents_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                                  chunk_size: int) -> torch.Tensor:
    """Shen et al.'s efficient attention with packed documents on this rank's chunk: the states of
    every rank's last document (`efficient_chunk_states` over its positions), those of the ranks
    that continue the document rank r - 1 ends with (`continued_document`) rescaled and summed,
    carried on to the tokens of that document only."""
    contiguous_only("linear")
    before, joins = continued_document(segment_ids)
    in_last = (segment_ids == segment_ids[:, -1:])[:, None, :, None]  # [b, 1, C, 1]
    states = efficient_chunk_states(k, v, in_last)  # [b, g, N, d, e + 2]
    initial = (*rescaled_sum(states, joins[:, None, :, None]), before)
    return segmented_efficient_attention(q, k, v, segment_ids, chunk_size, initial)
