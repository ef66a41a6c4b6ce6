"""The core-attention contract of megatron-core 0.16.1, shared by every megalong attention kind.

megatron's SelfAttention projects q/k/v, applies RoPE, and hands this module tensors of shape
[seq, batch, heads_on_this_rank, head_dim]; it expects [seq, batch, heads_on_this_rank * head_dim]
back. Subclasses implement `attend(q, k, v)` on [batch, heads, seq, head_dim] and build their own
masks from positions, on the input's device: megatron's `attention_mask` is not used.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from megalong.attention.alibi import alibi_slopes


def tensor_parallel_rank_and_size(pg_collection: Any = None) -> tuple[int, int]:
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp.rank(), pg_collection.tp.size()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return 0, 1


class CoreAttention(nn.Module):
    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any = None,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Any = None,
                 pg_collection: Any = None, alibi: bool = False):
        super().__init__()
        self.layer_number = layer_number
        tp_rank, tp_size = tensor_parallel_rank_and_size(pg_collection)
        self.heads_per_rank = config.num_attention_heads // tp_size
        # A head's global index is tp_rank * heads_per_rank + i: per-head constants use it so that
        # TP=2 computes exactly what TP=1 does.
        self.first_head = tp_rank * self.heads_per_rank
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.alibi = alibi
        self.total_heads = config.num_attention_heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, attn_mask_type: Any = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(f"{type(self).__name__}: packed sequences are not supported")
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} builds its mask from positions; "
                             "pass attention_mask=None to the model")
        seq, batch, heads, head_dim = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if k.shape[1] != heads:  # grouped-query attention: share each key/value head
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        out = self.attend(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def alibi_slopes(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This rank's heads' ALiBi slopes. Computed when needed rather than kept in a buffer:
        nothing to save, and nothing for a meta-device model construction to leave unset."""
        slopes = alibi_slopes(self.total_heads)[self.first_head: self.first_head + self.heads_per_rank]
        return slopes.to(device=device, dtype=dtype)
