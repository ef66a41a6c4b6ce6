"""The core-attention contract of megatron-core 0.16.1, shared by every megalong attention kind.

megatron's SelfAttention projects q/k/v, applies RoPE, and hands this module tensors of shape
[seq, batch, heads_on_this_rank, head_dim]; it expects [seq, batch, heads_on_this_rank * head_dim]
back. Subclasses implement `attend(q, k, v)` on [batch, heads, seq, head_dim] and build their own
masks from positions, on the input's device: megatron's `attention_mask` is not used.

Packed documents (`data.document_mask`) arrive as `packed_seq_params`, a `DocumentSegments`
(megalong/attention/segments.py): then `attend_documents(q, k, v, segment_ids)` runs instead, and a
kind that does not define it refuses (segments are never ignored).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalong.attention.alibi import alibi_bias, alibi_slopes
from megalong.attention.options import AttentionOptions, GlobalOptions
from megalong.attention.segments import segments_of
from megalong.parallel.context import context_size


def tensor_parallel_rank_and_size(pg_collection: Any = None) -> tuple[int, int]:
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp.rank(), pg_collection.tp.size()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return 0, 1


class CoreAttention(nn.Module):
    """`options`: the kind's typed options (the config's, built once when it was loaded); or,
    for a module built by hand, its fields as keyword arguments (`window=8`)."""

    options_class: type[AttentionOptions] = GlobalOptions

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any = None,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Any = None,
                 pg_collection: Any = None, alibi: bool = False,
                 options: Optional[AttentionOptions] = None, **option_values: Any):
        super().__init__()
        if options is None:
            options = self.options_class(**option_values)
        elif option_values:
            raise TypeError(f"{type(self).__name__}: give options or {sorted(option_values)}, not both")
        if not isinstance(options, self.options_class):
            raise TypeError(f"{type(self).__name__}: options must be {self.options_class.__name__}, "
                            f"got {type(options).__name__}")
        self.options = options
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
        segment_ids = segments_of(packed_seq_params)
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} builds its mask from positions; "
                             "pass attention_mask=None to the model")
        seq, batch, heads, head_dim = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if not (self.grouped_context if context_size() > 1 else self.grouped_kv):
            k, v = per_query_head(k, heads), per_query_head(v, heads)
        if context_size() > 1:  # this rank holds one chunk of the sequence (parallel.context)
            out = self.attend_context(q, k, v, segment_ids)
        elif segment_ids is None:
            out = self.attend(q, k, v)
        else:
            out = self.attend_documents(q, k, v, segment_ids)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)  # heads_on_this_rank * head_dim

    # Grouped-query attention: True when `attend` / `attend_documents` take k and v with one head
    # per group ([b, groups, s, d], query head i reading group i // (heads / groups)) and never
    # copy them per query head; otherwise the base hands them per query head (a copy).
    grouped_kv: bool = False
    # The same for `attend_context` (parallel.context > 1): True when it takes the groups, so that
    # what crosses the context ranks (ring blocks, halos, gathered keys, states) has one head per
    # group, heads / groups times fewer bytes than per query head.
    grouped_context: bool = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attend_documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor) -> torch.Tensor:
        """`attend` with packed documents: segment_ids [b, s] (segments.py); no query sees a key of
        another document. Kinds that support `data.document_mask` override it."""
        raise NotImplementedError(f"{type(self).__name__}: packed documents (data.document_mask) are "
                                  "not supported by this attention kind")

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """`attend` (or `attend_documents`) on this context-parallel rank's chunk of the sequence
        (megalong/attention/context_attention.py). Kinds that support `parallel.context` override it."""
        raise NotImplementedError(f"{type(self).__name__}: parallel.context > 1 is not supported by "
                                  "this attention kind")

    @property
    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    # ---- incremental decoding (generation with a cache) -------------------------------------
    # `decode` attends the n newest tokens given `state`, what the kind kept of the tokens before
    # them (None before the prompt). Three ways, chosen by what the kind defines:
    # - a key/value cache: `kv_cache` is True and `cache_visible` / `cache_keep` say which keys a
    #   query sees and which keys a later query may still see (global: all; local: its window);
    # - a recurrent state: the kind defines `init_state(batch, heads, head_dim, device, dtype)`
    #   and `step(q, k, v, state) -> (out, state)` for one token (linear);
    # - otherwise the default: keep q, k, v of the whole context and run `attend` on it again,
    #   which is exact for any causal kind (it costs the kind's own cost on the context).
    kv_cache: bool = False
    # False when a position's output depends on more than the tokens up to it (e.g. on the
    # sequence length): nothing can be kept, generation reruns such a layer and every later one.
    prefix_stable: bool = True

    def cache_visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean [n, m] or [heads, n, m]: which keys (positions k_pos) the queries at q_pos see."""
        raise NotImplementedError

    def cache_keep(self, k_pos: torch.Tensor, next_pos: int) -> torch.Tensor:
        """Boolean [m]: keys some query at a position >= next_pos may still see."""
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        """q, k, v [batch, heads, n, head_dim] of the n tokens following those in `state` ->
        (output [batch, heads, n, head_dim], the state to pass with the next tokens)."""
        if self.kv_cache:  # the cache holds groups: SDPA indexes them per query head
            return self._decode_kv(q, k, v, state)
        if not self.grouped_kv:
            k, v = per_query_head(k, q.shape[1]), per_query_head(v, q.shape[1])
        if callable(getattr(self, "step", None)) and callable(getattr(self, "init_state", None)):
            return self._decode_recurrent(q, k, v, state)
        if state is not None:
            q, k, v = (torch.cat([state[name], x], dim=2) for name, x in zip("qkv", (q, k, v)))
        n = q.shape[2] - (0 if state is None else state["q"].shape[2])
        return self.attend(q, k, v)[:, :, -n:], {"q": q, "k": k, "v": v}

    def _decode_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        start = 0 if state is None else state["next"]
        n = q.shape[2]
        q_pos = torch.arange(start, start + n, device=q.device)
        if state is not None:
            k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            k_pos = torch.cat([state["pos"], q_pos])
        else:
            k_pos = q_pos
        visible = self.cache_visible(q_pos, k_pos)
        if self.alibi:  # by true distance, whatever the cache dropped
            mask = alibi_bias(self.alibi_slopes(q.device, q.dtype), q_pos[:, None] - k_pos[None, :])
            mask = mask.masked_fill(~visible, float("-inf"))
        else:
            mask = visible
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        keep = self.cache_keep(k_pos, start + n)
        return out, {"k": k[:, :, keep], "v": v[:, :, keep], "pos": k_pos[keep], "next": start + n}

    def _decode_recurrent(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        b, _, n, d = q.shape
        init_state: Callable[..., Any] = getattr(self, "init_state")  # noqa: B009 (defined by recurrent kinds)
        step: Callable[..., tuple[torch.Tensor, Any]] = getattr(self, "step")  # noqa: B009
        # one state per key/value head: a group's, shared by its query heads (grouped_kv kinds)
        inner = init_state(b, k.shape[1], d, q.device, q.dtype) if state is None else state["inner"]
        outs = []
        for i in range(n):
            out, inner = step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], inner)
            outs.append(out)
        return torch.cat(outs, dim=2), {"inner": inner}

    def alibi_slopes(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This rank's heads' ALiBi slopes. Computed when needed rather than kept in a buffer:
        nothing to save, and nothing for a meta-device model construction to leave unset."""
        slopes = alibi_slopes(self.total_heads)[self.first_head: self.first_head + self.heads_per_rank]
        return slopes.to(device=device, dtype=dtype)


def per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, groups, s, d] -> [b, heads, s, d], query head i reading group i // (heads / groups): a
    copy, for the kinds whose attend does not index groups (grouped_kv False)."""
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)
