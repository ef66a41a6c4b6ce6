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

from megalong.attention.segments import heads_first, same_document

State = tuple[torch.Tensor, ...]


def _chunks(L: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, L)) for start in range(0, L, chunk_size)]


def segmented_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                               eps: float, chunk_size: int,
                               initial: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                               ) -> torch.Tensor:
    """Katharopoulos's causal form on features fq, fk [b, h, L, d], v [b, h, L, e], restarting at
    every document of segment_ids [b, L]. `initial`: (S [b, h, d, e], z [b, h, d], the segment id
    [b] of the position before these) of the tokens before them (context parallelism), which
    tokens of that document continue."""
    b, h, L, d = fq.shape
    seg = heads_first(segment_ids)  # [b, 1, L]
    S = fq.new_zeros(b, h, d, v.shape[-1])
    z = fq.new_zeros(b, h, d)
    last_prev: Optional[torch.Tensor] = None
    if initial is not None:
        S, z, last_prev = initial[0], initial[1], initial[2].view(b, 1)
    outs = []
    for part in _chunks(L, chunk_size):
        Q, K, V, sc = fq[:, :, part], fk[:, :, part], v[:, :, part], seg[..., part]
        c = Q.shape[2]
        causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
        A = torch.matmul(Q, K.transpose(-1, -2)).masked_fill(~(causal & same_document(sc, sc)), 0.0)
        num, den = torch.matmul(A, V), A.sum(dim=-1)
        if last_prev is not None:
            carried = (sc == last_prev.unsqueeze(-1)).to(Q.dtype)  # [b, 1, c]: continues the previous chunk's document
            num = num + torch.matmul(Q, S) * carried.unsqueeze(-1)
            den = den + (Q * z.unsqueeze(2)).sum(dim=-1) * carried
        outs.append(num / (den + eps).unsqueeze(-1))
        last = sc[..., -1]  # [b, 1]
        K_last = K * (sc == last.unsqueeze(-1)).to(K.dtype).unsqueeze(-1)
        keep = torch.zeros_like(last, dtype=K.dtype) if last_prev is None else (last == last_prev).to(K.dtype)
        S = S * keep.view(b, 1, 1, 1) + torch.matmul(K_last.transpose(-1, -2), V)
        z = z * keep.view(b, 1, 1) + K_last.sum(dim=2)
        last_prev = last
    return torch.cat(outs, dim=2)


def segmented_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                                  chunk_size: int) -> torch.Tensor:
    """Shen et al.'s causal efficient attention (linear.efficient_chunk) restarting at every
    document of segment_ids [b, L]: q, k [b, h, L, d], v [b, h, L, e]. The running maximum is the
    document's own from its first chunk on (a large key of an earlier document cannot underflow a
    later document's sums)."""
    b, h, L, d = q.shape
    seg = heads_first(segment_ids)
    N = q.new_zeros(b, h, d, v.shape[-1])
    D = q.new_zeros(b, h, d)
    m = torch.full_like(D, float("-inf"))
    last_prev: Optional[torch.Tensor] = None
    outs = []
    for part in _chunks(L, chunk_size):
        qc, kc, vc, sc = q[:, :, part], k[:, :, part], v[:, :, part], seg[..., part]
        c = qc.shape[2]
        m_new = torch.maximum(m, kc.amax(dim=2)).detach()
        rescale = torch.exp(m - m_new)  # 0 for the empty state (m = -inf)
        N, D = N * rescale.unsqueeze(-1), D * rescale
        w = torch.exp(kc - m_new.unsqueeze(2))  # [b, h, c, d]
        visible = torch.ones(c, c, dtype=torch.bool, device=q.device).tril() & same_document(sc, sc)  # [b, 1, c, c]
        carried = (torch.zeros_like(sc, dtype=w.dtype) if last_prev is None
                   else (sc == last_prev.unsqueeze(-1)).to(w.dtype)).unsqueeze(-1)  # [b, 1, c, 1]
        prefix = carried * D.unsqueeze(2) + torch.matmul(visible.to(w.dtype), w)  # own document's sum_{j<=i}
        q_over = torch.softmax(qc, dim=-1) / prefix
        A = torch.matmul(q_over, w.transpose(-1, -2)).masked_fill(~visible, 0.0)
        outs.append(torch.matmul(A, vc) + torch.matmul(q_over, N) * carried)
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
