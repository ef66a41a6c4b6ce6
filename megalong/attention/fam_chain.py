"""The FAM chain of a `fam` layer (fam.py): F_t from F_{t-1} and block t, block after block, with
the restarts of packed documents. One function for the one-process path (fam.py) and for a
context-parallel rank's chunk of blocks (context_fam.py), which starts from the state the rank
before it handed over.

Packed documents: F_t belongs to the document of block t's last token. Where that document is
not F_{t-1}'s (it started inside block t), F_t restarts from the initial FAM (its queries, keys
and values those of the learned embeddings, its distance to the block counted from the
document's start) and reads only that document's tokens of block t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from megalong.attention.segments import document_positions

if TYPE_CHECKING:
    from megalong.attention.fam import FamAttention

# hidden [s, b, w] -> q, k, v [b, heads (or key/value groups for k, v), s, d]
Project = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (FAM queries' context [b, h, F, d], F_{t-1} [F, b, w]) -> F_t (attention residual, then MLP)
Advance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FamDocuments:
    """What `FamAttention.blocks` needs of packed documents: segment_ids [b, L]; fam_docs [b, blocks],
    the document F_{t-1} belongs to for block t; k_init, v_init [b, groups, fam_length, d], the initial
    FAM's keys and values (None without FAM)."""

    segment_ids: torch.Tensor
    fam_docs: torch.Tensor
    k_init: Optional[torch.Tensor] = None
    v_init: Optional[torch.Tensor] = None


@dataclass
class ChainDocuments:
    """Packed documents of a row of blocks: segment_ids [b, s] of their tokens; last [b, n], the
    document of block t's last token (F_t's); fam_docs [b, n], F_{t-1}'s (block t continues it);
    starts [b, n], where block t's last document starts (a position among these tokens, used only
    when it started inside block t)."""

    segment_ids: torch.Tensor
    last: torch.Tensor
    fam_docs: torch.Tensor
    starts: torch.Tensor


def chain_documents(segment_ids: torch.Tensor, block_size: int, before: torch.Tensor) -> ChainDocuments:
    """The blocks' documents of segment_ids [b, s]; `before` [b]: the document of the FAM state
    entering the first block (the first token's at the sequence start, the last token's of the
    previous chunk at context parallelism)."""
    s = segment_ids.shape[1]
    n = -(-s // block_size)
    ends = (torch.arange(1, n + 1, device=segment_ids.device) * block_size).clamp(max=s) - 1  # blocks' last
    last = segment_ids[:, ends]
    starts = ends - document_positions(segment_ids)[:, ends]
    return ChainDocuments(segment_ids, last, torch.cat([before.view(-1, 1), last[:, :-1]], dim=1), starts)


def fam_chain(fam: torch.Tensor, attention: "FamAttention", project: Project, advance: Advance,
              k: torch.Tensor, v: torch.Tensor, steps: int, documents: Optional[ChainDocuments] = None,
              initial: Optional[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_fam, v_fam [b, g, n, F, d]: the keys and values of F_{t-1} for each of the n blocks of
    k, v [b, g, s, d]; the state after `steps` blocks (n, or n - 1 when nothing follows the last
    block)), from fam [F, b, w], the state entering the first block. With `documents`,
    `initial` = (the initial FAM [F, b, w], its project()) is where a restart starts from."""
    B = attention.block_size
    n = -(-k.shape[2] // B)
    b = fam.shape[1]
    k_list, v_list = [], []
    for t in range(n):
        qf, kf, vf = project(fam)
        k_list.append(kf)
        v_list.append(vf)
        if t == steps:
            break
        block = slice(t * B, (t + 1) * B)
        if documents is None or initial is None:
            context = attention.fam_step(qf, kf, vf, k[:, :, block], v[:, :, block])
        else:  # restart from the initial FAM where block t's last document started inside it
            restart = documents.last[:, t] != documents.fam_docs[:, t]  # [b]
            start, start_qkv = initial
            qf, kf, vf = (torch.where(restart.view(b, 1, 1, 1), u0, u) for u0, u in zip(start_qkv, (qf, kf, vf)))
            fam = torch.where(restart.view(1, b, 1), start, fam)
            starts = documents.starts[:, t]
            distance = torch.where(restart, (t + 1) * B - starts, torch.full_like(starts, B))
            context = attention.fam_step(qf, kf, vf, k[:, :, block], v[:, :, block],
                                         documents.segment_ids[:, block] == documents.last[:, t:t + 1], distance)
        fam = advance(context, fam)
    return torch.stack(k_list, dim=2), torch.stack(v_list, dim=2), fam
