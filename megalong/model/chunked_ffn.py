"""Chunked feed-forward (`execution.ffn_chunks: n`): a dense MLP run over n slices of the sequence.

Each slice goes through the MLP under `torch.utils.checkpoint` (non-reentrant, RNG preserved):
the forward keeps only the slice's input, and the backward recomputes that slice's 4x-wide
intermediate just before back-propagating through it, so the intermediate never exists for more
than one slice at a time, forward or backward. The result and the gradients are those of the
unchunked MLP (the MLP acts on every token independently).

MoE layers are not chunked: their experts already work on per-expert rows, and capacity and the
auxiliary loss depend on the whole batch of tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.mlp import MLP
from torch.utils.checkpoint import checkpoint


class ChunkedMLP(MLP):
    """megatron's MLP over `ffn_chunks` slices of the sequence (dimension 0 of [s, b, h])."""

    ffn_chunks: int = 1

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.ffn_chunks == 1:
            return super().forward(hidden_states, *args, **kwargs)
        outputs, bias = [], None
        for piece in hidden_states.chunk(self.ffn_chunks, dim=0):
            out, bias = checkpoint(MLP.forward, self, piece, *args, use_reentrant=False, **kwargs)
            outputs.append(out)
        return torch.cat(outputs, dim=0), bias


def chunk_mlps(model: torch.nn.Module, chunks: int) -> int:
    """Make every dense megatron MLP of `model` a ChunkedMLP of `chunks` slices, in place (same
    parameters and names). Returns how many MLPs were changed."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"execution.ffn_chunks: must be an integer >= 1, got {chunks!r}")
    changed = 0
    for module in model.modules():
        if type(module) is MLP or type(module) is ChunkedMLP:
            module.__class__ = ChunkedMLP
            module.ffn_chunks = chunks
            changed += 1
    return changed
