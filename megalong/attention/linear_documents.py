"""`linear` over packed documents: the state and the normaliser restart at every document start.

For a query of document s, the sums S, z (elu) or N, D (efficient) run over the earlier keys of
document s only, exactly as if s were run alone. Computed chunk by chunk like the plain forms:
inside a chunk the pair mask is causal and same-document; the state carried into a chunk serves
only the queries of the document the previous chunk ended in, and the state carried out of a
chunk is that of the document it ends in (continued when no document started inside it, else
summed afresh from the chunk's tokens of that document). Segment ids never decrease along a row
(megalong/attention/segments.py), so "same document as the previous chunk's last token" is the
whole test.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalong.attention.grouped import stack_heads, unstack_heads
from megalong.attention.segments import heads_first, same_document

State = tuple[torch.Tensor, ...]


def _chunks(L: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, L)) for start in range(0, L, chunk_size)]


def segmented_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                               eps: float, chunk_size: int,
                               initial: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                               ) -> torch.Tensor:
    """Katharopoulos's causal form on features fq [b, h, L, d], fk [b, g, L, d], v [b, g, L, e]
    (g key/value groups dividing h; one state per group, a group's query heads stacked along the
    rows: grouped.py), restarting at every document of segment_ids [b, L]. `initial`: (S [b, g, d, e],
    z [b, g, d], the segment id [b] of the position before these) of the tokens before them
    (context parallelism), which tokens of that document continue."""
    b, h, L, d = fq.shape
    g = fk.shape[1]
    j = h // g
    seg = heads_first(segment_ids)  # [b, 1, L]
    S = fq.new_zeros(b, g, d, v.shape[-1])
    z = fq.new_zeros(b, g, d)
    last_prev: Optional[torch.Tensor] = None
    if initial is not None:
        S, z, last_prev = initial[0], initial[1], initial[2].view(b, 1)
    outs = []
    for part in _chunks(L, chunk_size):
        Q, K, V, sc = stack_heads(fq[:, :, part], g), fk[:, :, part], v[:, :, part], seg[..., part]
        c = K.shape[2]
        causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
        visible = (causal & same_document(sc, sc)).repeat(1, 1, j, 1)  # [b, 1, j * c, c]
        A = torch.matmul(Q, K.transpose(-1, -2)).masked_fill(~visible, 0.0)
        num, den = torch.matmul(A, V), A.sum(dim=-1)
        if last_prev is not None:
            # [b, 1, j * c]: the rows that continue the previous chunk's document
            carried = (sc == last_prev.unsqueeze(-1)).to(Q.dtype).repeat(1, 1, j)
            num = num + torch.matmul(Q, S) * carried.unsqueeze(-1)
            den = den + (Q * z.unsqueeze(2)).sum(dim=-1) * carried
        outs.append(unstack_heads(num / (den + eps).unsqueeze(-1), h))
        last = sc[..., -1]  # [b, 1]
        K_last = K * (sc == last.unsqueeze(-1)).to(K.dtype).unsqueeze(-1)
        keep = torch.zeros_like(last, dtype=K.dtype) if last_prev is None else (last == last_prev).to(K.dtype)
        S = S * keep.view(b, 1, 1, 1) + torch.matmul(K_last.transpose(-1, -2), V)
        z = z * keep.view(b, 1, 1) + K_last.sum(dim=2)
        last_prev = last
    return torch.cat(outs, dim=2)


def segmented_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                                  chunk_size: int, initial: Optional[State] = None) -> torch.Tensor:
    """Shen et al.'s causal efficient attention (linear.efficient_chunk) restarting at every
    document of segment_ids [b, L]: q [b, h, L, d], k [b, g, L, d], v [b, g, L, e] (one state per
    key/value group, as in segmented_linear_attention). The running maximum is the document's own
    from its first chunk on (a large key of an earlier document cannot underflow a later
    document's sums). `initial`: (N [b, g, d, e], D [b, g, d], m [b, g, d], the segment id [b] of
    the position before these) of the tokens before them (context parallelism), which tokens of
    that document continue."""
    b, h, L, d = q.shape
    g = k.shape[1]
    j = h // g
    seg = heads_first(segment_ids)
    N = q.new_zeros(b, g, d, v.shape[-1])
    D = q.new_zeros(b, g, d)
    m = torch.full_like(D, float("-inf"))
    last_prev: Optional[torch.Tensor] = None
    if initial is not None:
        N, D, m, last_prev = initial[0], initial[1], initial[2], initial[3].view(b, 1)
    outs = []
    for part in _chunks(L, chunk_size):
        qc, kc, vc, sc = q[:, :, part], k[:, :, part], v[:, :, part], seg[..., part]
        c = qc.shape[2]
        m_new = torch.maximum(m, kc.amax(dim=2)).detach()
        rescale = torch.exp(m - m_new)  # 0 for the empty state (m = -inf)
        N, D = N * rescale.unsqueeze(-1), D * rescale
        w = torch.exp(kc - m_new.unsqueeze(2))  # [b, g, c, d]
        visible = torch.ones(c, c, dtype=torch.bool, device=q.device).tril() & same_document(sc, sc)  # [b, 1, c, c]
        carried = (torch.zeros_like(sc, dtype=w.dtype) if last_prev is None
                   else (sc == last_prev.unsqueeze(-1)).to(w.dtype)).unsqueeze(-1)  # [b, 1, c, 1]
        prefix = carried * D.unsqueeze(2) + torch.matmul(visible.to(w.dtype), w)  # own document's sum_{j<=i}
        # the group's query heads stacked along the rows (grouped.py): [b, g, j * c, .]
        q_over = stack_heads(torch.softmax(qc, dim=-1), g) / prefix.repeat(1, 1, j, 1)
        rows_visible, rows_carried = visible.repeat(1, 1, j, 1), carried.repeat(1, 1, j, 1)
        A = torch.matmul(q_over, w.transpose(-1, -2)).masked_fill(~rows_visible, 0.0)
        outs.append(unstack_heads(torch.matmul(A, vc) + torch.matmul(q_over, N) * rows_carried, h))
        # The state after the chunk: the sums of the document it ends in.
        last = sc[..., -1]
        in_last = (sc == last.unsqueeze(-1)).unsqueeze(-1)  # [b, 1, c, 1]
        keep = torch.zeros_like(last, dtype=torch.bool) if last_prev is None else last == last_prev  # [b, 1]
        m_last = torch.where(keep.unsqueeze(-1), m_new,
                             kc.masked_fill(~in_last, float("-inf")).amax(dim=2).detach())
        w_last = torch.where(in_last, torch.exp(kc - m_last.unsqueeze(2)), torch.zeros_like(kc))
        N = torch.where(keep.view(b, 1, 1, 1), N, torch.zeros_like(N)) + torch.matmul(w_last.transpose(-1, -2), vc)
        D = torch.where(keep.view(b, 1, 1), D, torch.zeros_like(D)) + w_last.sum(dim=2)
        m = m_last
        last_prev = last
    return torch.cat(outs, dim=2)


def restart_state(state: State, initial: State, starts: torch.Tensor) -> State:
    """The recurrent state with the rows whose next token starts a document (starts [b] bool)
    replaced by the initial state: `step` after it equals running that document alone."""
    out = []
    for current, init in zip(state, initial):
        mask = starts.view(-1, *([1] * (current.dim() - 1)))
        out.append(torch.where(mask, init, current))
    return tuple(out)
