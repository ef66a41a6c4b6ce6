"""Chunked output layer and cross-entropy (`execution.loss_chunks: n`).

The last stage's logits are [seq, batch, vocab / TP] float32: at a 50k vocabulary they outweigh
every other activation of a small model, and the unchunked path keeps them (as the softmax saved
by the vocab-parallel cross-entropy) from the forward until the backward, plus their gradient.

With n chunks, the hidden states and labels are cut into n slices of the sequence, and each slice's
logits and per-token loss are computed under `torch.utils.checkpoint` (non-reentrant): the forward
keeps only the slice's hidden states, and the backward recomputes that slice's logits just before
back-propagating through them. So the logits and their gradient exist for one slice at a time,
forward and backward, at the price of one more output-layer matmul. The per-token losses and all
gradients are those of the unchunked path (every token's loss depends on its own logits only);
tied embeddings receive the output layer's gradient through the same weight, summed over slices
by autograd before it is accumulated once.

Only the training/evaluation path (labels given) is chunked; without labels the model returns
the full logits as before (inference, export).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.gpt import GPTModel
from torch.utils.checkpoint import checkpoint


class ChunkedLossGPTModel(GPTModel):
    """GPTModel whose post-process computes logits and loss over `loss_chunks` sequence slices."""

    loss_chunks: int = 1

    def _postprocess(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, labels: Optional[torch.Tensor], *args: Any,
                     **kwargs: Any) -> torch.Tensor:
        plain = (self.loss_chunks == 1 or labels is None or not self.post_process
                 or self.config.mtp_num_layers is not None or has_config_logger_enabled(self.config)
                 or kwargs.get("mtp_in_postprocess") or kwargs.get("inference_context") is not None)
        if plain or args:  # megatron calls it with keywords; anything else takes its own path
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        gather = kwargs.get("runtime_gather_output")
        # tensor_split: slices as even as the length allows (validation makes them equal in training)
        pieces = zip(hidden_states.tensor_split(self.loss_chunks, dim=0),
                     labels.tensor_split(self.loss_chunks, dim=1))
        losses = [checkpoint(self._slice_loss, h, y, weight, gather, use_reentrant=False)
                  for h, y in pieces]
        return torch.cat(losses, dim=1)  # [batch, seq], like compute_language_model_loss

    def _slice_loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor],
                    gather: Optional[bool]) -> torch.Tensor:
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=gather)
        return self.compute_language_model_loss(labels, logits)


def attach_chunked_loss(model: GPTModel, chunks: int) -> None:
    """Make `model` (a GPTModel holding the output layer) compute its loss in `chunks` sequence
    slices, in place: same parameters, names and outputs."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"execution.loss_chunks: must be an integer >= 1, got {chunks!r}")
    if not model.post_process:
        raise ValueError("execution.loss_chunks: this model part has no output layer (not the last pipeline stage)")
    if type(model) not in (GPTModel, ChunkedLossGPTModel):
        raise TypeError(f"execution.loss_chunks: expects megatron-core's GPTModel, got {type(model).__name__}")
    if model.config.sequence_parallel:
        # the output layer would gather sequence-parallel slices of every rank into one chunk
        raise ValueError("execution.loss_chunks: not supported with sequence parallelism")
    model.__class__ = ChunkedLossGPTModel
    model.loss_chunks = chunks
