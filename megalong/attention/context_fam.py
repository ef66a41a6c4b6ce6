"""`fam` (TransformerFAM) across context-parallel ranks (megalong/parallel/context.py): each rank
holds whole blocks (its chunk C a multiple of `block_size` B; other chunks are refused).

What crosses ranks, per layer (N ranks, h heads of width d, F = fam_length, hidden width w):
- block memory: the keys and values of the `memory_segments` x B positions before the chunk, sent
  point to point by the earlier rank(s) that hold them (several when the memory is longer than a
  chunk): 2 x min(m x B, r x C) x g x d values received by rank r (g key/value groups, h
  without grouped-query attention), independent of L;
- the feedback memory: F_{t-1} of a rank's first block is the last F of the rank before it, so the
  FAM chain is handed from rank to rank: F x w values per rank and layer, and the backward hands
  its gradient back the other way.

Packed documents (segment ids): the halo carries the memory's segment ids (at least one, the
previous rank's last: the document of the state it hands over). The chain then runs as in one
process (fam_chain.py): the handed state serves the tokens of the document it belongs to, and a
block whose last document starts inside it (a chunk's first block included, when a document starts
exactly at the chunk's start) restarts from the initial FAM; a document that spans several ranks
carries its state through each of them.

The cost of that serialisation: the FAM chain (F tokens per block through the layer's attention
step, norms and MLP, C / B steps per rank) runs on one rank after another, so a layer's forward
waits (N - 1) chains of C / B steps before the last rank starts its own, and the backward likewise
in reverse. What overlaps: the queries, keys and values of the whole chunk are projected and the
memory halo is exchanged before a rank waits for its state; in the backward the block tokens'
attention (the O(C x ((m + 1) x B + F)) part, where nearly all the work is) is back-propagated
before the rank waits for its state's gradient (the zero from `send_state` is added to the
queries, whose gradient is complete only after the blocks' backward). The chain itself is
(F / B) of the layer's tokens, so the serial part is that fraction of the layer's work times N.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megalong.attention.fam_chain import (Advance, ChainDocuments, FamDocuments, Project, chain_documents,
                                         fam_chain)
from megalong.parallel.context import context_rank, context_size
from megalong.parallel.point_to_point import halo_before, receive_state, send_state

if TYPE_CHECKING:
    from megalong.attention.fam import FamAttention


def fam_context(x: torch.Tensor, fam_init: Optional[torch.Tensor], attention: "FamAttention",
                project: Project, advance: Advance, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The block tokens' attention output [b, h, C, d] of this rank's chunk x [C, b, w] (project:
    the key/value groups, which the halo carries), exactly as one process computes it for these positions of
    the whole sequence; segment_ids [b, C]: this chunk's packed documents."""
    C, b, w = x.shape
    B, m = attention.block_size, attention.memory_segments
    if C % B:
        raise NotImplementedError(f"fam attention: parallel.context needs chunks of whole blocks, got a "
                                  f"chunk of {C} tokens for model.attention.fam.block_size {B}")
    r, n = context_rank(), context_size()
    q, k, v = project(x)
    k_mem, v_mem = halo_before(torch.stack([k, v]), m * B, 3).unbind(0)  # one message for both
    need = k_mem.shape[2]  # whole blocks: the memory is m blocks, or every block before the chunk
    halo_blocks = need // B  # their queries are dropped: any FAM keys serve
    chain: Optional[ChainDocuments] = None
    documents: Optional[FamDocuments] = None
    if segment_ids is not None:
        seg_before = halo_before(segment_ids, max(m * B, 1), 1)  # the memory's, and the last one before
        before = seg_before[:, -1] if r else segment_ids[:, 0]
        chain = chain_documents(segment_ids, B, before)
        documents = FamDocuments(torch.cat([seg_before[:, seg_before.shape[1] - need:], segment_ids], dim=1),
                                 torch.cat([chain.fam_docs.new_full((b, halo_blocks), -1), chain.fam_docs], dim=1))
    k_fam = v_fam = None
    sent = None
    if fam_init is not None:
        initial = fam_init.unsqueeze(1).expand(-1, b, -1)
        start = None
        if documents is not None:
            start = (initial, project(initial))
            documents.k_init, documents.v_init = start[1][1], start[1][2]
        # anchored on q (the layer's weights): x needs no gradient (an input), the sender's state does
        fam = initial if r == 0 else receive_state(q, x, (fam_init.shape[0], b, w))
        blocks = C // B
        # F after the last block of the sequence serves nothing
        k_fam, v_fam, fam = fam_chain(fam, attention, project, advance, k, v,
                                      blocks - 1 if r == n - 1 else blocks, chain, start)
        if r < n - 1:
            sent = send_state(fam)
        if halo_blocks:
            k_fam = torch.cat([k_fam.new_zeros(b, k_fam.shape[1], halo_blocks, *k_fam.shape[3:]), k_fam], dim=2)
            v_fam = torch.cat([v_fam.new_zeros(b, v_fam.shape[1], halo_blocks, *v_fam.shape[3:]), v_fam], dim=2)
    if sent is not None:  # the state's gradient is awaited once the blocks' backward reached q
        q = q + sent
    q = torch.cat([q.new_zeros(*q.shape[:2], need, q.shape[3]), q], dim=2)
    out = attention.blocks(q, torch.cat([k_mem, k], dim=2), torch.cat([v_mem, v], dim=2), k_fam, v_fam, documents)
    return out[:, :, need:]
