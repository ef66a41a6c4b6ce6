"""Packed documents in a training batch: segment ids, position ids and the loss mask, on the device.

The `data` section's `document_mask`, `reset_position_ids` and `eod_mask_loss` act here, on the
batch once it is on its device (megalong/attention/segments.py has the helpers): the segment ids
are a cumulative sum over the EOD tokens (no host sync, no L x L mask), and every pipeline stage
derives them from the token ids it reads anyway, so nothing extra crosses a stage boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megalong.attention.segments import DocumentSegments, document_positions, segment_ids_from_tokens


@dataclass(frozen=True)
class DocumentBatching:
    eod: int
    document_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def from_config(cls, data: Any, eod: int) -> Optional["DocumentBatching"]:
        """From the config's `data` section; None when all three are off (batches as they come)."""
        if not (data.document_mask or data.reset_position_ids or data.eod_mask_loss):
            return None
        return cls(int(eod), bool(data.document_mask), bool(data.reset_position_ids), bool(data.eod_mask_loss))

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with `segment_ids` [b, s] (document_mask), `position_ids` restarting in every
        document (reset_position_ids) and the loss dropped where the input is EOD (eod_mask_loss)."""
        tokens = batch["tokens"]
        out = dict(batch)
        segments = segment_ids_from_tokens(tokens, self.eod)
        if self.document_mask:
            out["segment_ids"] = segments
        if self.reset_position_ids:
            out["position_ids"] = document_positions(segments)
        if self.eod_mask_loss:
            out["loss_mask"] = batch["loss_mask"] * (tokens != self.eod).to(batch["loss_mask"].dtype)
        return out


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(tokens, position_ids, keyword arguments) for GPTModel.forward from a batch: position ids
    0..s-1 unless the batch has its own, and the segment ids as `packed_seq_params`."""
    tokens = batch["tokens"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    kwargs: dict[str, Any] = {}
    if "segment_ids" in batch:
        kwargs["packed_seq_params"] = DocumentSegments(segment_ids=batch["segment_ids"])
    return tokens, positions, kwargs
