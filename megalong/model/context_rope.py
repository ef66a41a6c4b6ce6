"""RoPE at context parallelism (`parallel.context`): every token rotated by its true position.

megatron-core's RotaryEmbedding, at CP > 1, slices its table for megatron's own load-balanced
split of the sequence (`get_pos_emb_on_this_cp_rank`), which is not megalong's (contiguous
chunks, or megalong's zig-zag pieces: megalong/parallel/context.py). `rotate_by_true_positions`
makes it return the rows of the positions this rank holds (`rank_positions`), in storage order,
so that a token is rotated as it is in one process (position = index in the whole sequence, as
megatron's RoPE does at CP=1). megatron calls it with the length of this rank's chunk (its
config's context_parallel_size is 1: megalong's attention kinds do the context exchanges).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from megalong.parallel.context import context_rank, context_size, rank_positions


def _forward(self: nn.Module, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
             cp_group: object = None) -> torch.Tensor:
    n = context_size()
    if n == 1:
        return self.get_emb(max_seq_len, offset)
    length = max_seq_len * n  # the whole sequence: megatron passes one chunk's length
    emb = self.get_emb(length, offset)
    return emb[rank_positions(context_rank(), n, length, emb.device)]


def rotate_by_true_positions(rotary: nn.Module) -> None:
    """Make megatron's RotaryEmbedding `rotary` (freqs [s, 1, 1, d]) give, at CP > 1, the rows
    of this context rank's true positions; at CP=1 its own table, unchanged."""
    rotary.forward = types.MethodType(_forward, rotary)
