"""Packed documents: which document every token of a sample belongs to, and what follows from it.

megatron's GPTDataset packs documents end to end into each sample, an EOD token closing each one.
A sample's segment ids number its documents along the row: token i belongs to document
`segment_ids[b, i]` = the number of EOD tokens before it (an EOD token belongs to the document it
closes). They are computed on the device from the token ids (`segment_ids_from_tokens`, no host
sync, no L x L mask) and reach every core attention through megatron's `packed_seq_params`
argument as a `DocumentSegments` (megatron passes it from `GPTModel.forward` to every layer's
attention, through recompute, and megalong's own layers pass it on).

Documents are contiguous: segment ids never decrease along a row, so "same document" between a
query and an earlier key also means "no document start between them".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class DocumentSegments(PackedSeqParams):
    """megatron's packed-sequence parameters in the ordinary [s, b] layout (`qkv_format` "sbhd",
    so megatron changes nothing of its own) with the document of every token, `segment_ids`
    [b, s] int64. `max_seqlen_q/kv` are the sequence length (megatron sizes RoPE by them)."""

    segment_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.segment_ids is None or self.segment_ids.dim() != 2:
            raise ValueError("DocumentSegments: segment_ids must be a [batch, seq] tensor")
        self.qkv_format = "sbhd"
        self.max_seqlen_q = self.max_seqlen_kv = self.segment_ids.shape[1]


def segment_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] int64: the number of EOD tokens before each position (0 for the first document)."""
    ends = (tokens == eod).long()
    return torch.cumsum(ends, dim=1) - ends


def document_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: True at the first token of every document (position 0 included)."""
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return start


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] int64: each token's position inside its document (0 at every document start)."""
    s = segment_ids.shape[1]
    index = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    start_index = torch.where(document_starts(segment_ids), index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=1).values


def same_document(seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """[..., n, m] bool: query i and key j lie in the same document (seg_q [..., n], seg_k [..., m])."""
    return seg_q.unsqueeze(-1) == seg_k.unsqueeze(-2)


def segments_of(packed_seq_params: Any) -> Optional[torch.Tensor]:
    """The segment ids carried by megatron's `packed_seq_params` (None: one document per row).
    megatron's own `thd` packing (cu_seqlens) is refused: megalong packs as [s, b] with segment ids."""
    if packed_seq_params is None:
        return None
    if isinstance(packed_seq_params, DocumentSegments):
        return packed_seq_params.segment_ids
    raise NotImplementedError("megalong attention: packed sequences come as DocumentSegments "
                              "(data.document_mask), not megatron's thd format")


def heads_first(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, 1, s]: broadcasts against [b, heads, s] tensors."""
    return segment_ids.unsqueeze(1)
