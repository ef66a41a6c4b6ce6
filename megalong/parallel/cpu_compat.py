"""The places where megatron-core 0.16.1 assumes CUDA, made to run on a machine without it.

Each function here is applied only when CUDA is absent and only to the object it names, so GPU
runs use megatron-core unchanged.
"""
from __future__ import annotations

import types

import torch


def _rotary_emb_in_place(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    # megatron's RotaryEmbedding.get_emb, minus its move of `inv_freq` to the current CUDA device.
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if self.rotary_interleaved:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def keep_rotary_embedding_on_cpu(rotary: torch.nn.Module) -> None:
    """megatron's RoPE moves its inverse frequencies to `torch.cuda.current_device()` at the first
    forward, which raises without CUDA. Without CUDA, compute them where they are."""
    if not torch.cuda.is_available():
        rotary.get_emb = types.MethodType(_rotary_emb_in_place, rotary)
