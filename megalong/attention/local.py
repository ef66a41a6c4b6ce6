"""`local` (GPT-Neo, Longformer): causal sliding-window attention in O(L * window) time and memory.

A head with dilation d lets query position i see the keys i, i-d, ..., i-(window-1)d (d = 1 is
GPT-Neo's window: itself and the `window - 1` tokens before it). The heads sharing a dilation d
are computed together: the sequence is folded into d interleaved sub-sequences (positions r,
r+d, r+2d, ...), on which the window is an ordinary sliding window of `window` keys; each
sub-sequence is cut into blocks of `window` queries that attend to their own block's keys and the
previous block's. No L x L tensor exists.

Global tokens (Longformer): at the configured positions G, a token attends to every token before
it and itself, and every later token attends to it. As in Longformer, global rows use their own
projections Q_g, K_g, V_g (`LocalSelfAttention.linear_qkv_global`, initialised as a copy of the
local projection): row g is softmax(Q_g(x_g) . K_g(x_j), j <= g) V_g(x_j). The other rows attend
to the union of their window and the global tokens before them, with the ordinary keys and values
of the global tokens. With global tokens the core attention receives 2H heads from
`LocalSelfAttention`: the H local heads, then the H global-projection heads. Cost: O(L * (window +
|G|)).

ALiBi biases every score by -slope * (true distance i - j).

Packed documents (`attend_documents`): every pair above is also required to lie in one document,
so a token sees only its own document inside its window, and a global token belongs to its
document (it sees that document's earlier tokens, and only that document's later tokens see it).
The windowed kernel takes the segment ids too (and skips the key tiles of earlier documents).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention

from megalong.attention.alibi import alibi_bias
from megalong.attention import context_attention
from megalong.parallel.context import context_rank, context_size
from megalong.attention.base import CoreAttention
from megalong.attention.grouped import grouped_sdpa
from megalong.attention.options import LocalOptions
from megalong.attention.segments import same_document
from megalong.kernels import select as kernels



@kernels.eager
def window_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: Optional[int],
                  dilation: int, slopes: Optional[torch.Tensor], global_keys: Optional[torch.Tensor] = None,
                  q_positions: Optional[torch.Tensor] = None,
                  segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The windowed flash-attention kernel's output (megalong/kernels/window_attention.py)."""
    from megalong.kernels.window_attention import window_attention

    return window_attention(q, k, v, scale, window, dilation, slopes, global_keys, q_positions,
                            segment_ids=segment_ids)[0]


class LocalAttention(CoreAttention):
    options_class = LocalOptions
    options: LocalOptions
    grouped_kv = True  # k, v of key/value groups, torch path and kernel alike
    grouped_context = True  # attend_context too: the context exchanges carry the groups

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        options = self.options
        self.window = options.window
        dilation = options.dilation
        dilations = dilation if isinstance(dilation, list) else [dilation] * self.total_heads
        if len(dilations) != self.total_heads:
            raise ValueError(f"local attention: {len(dilations)} dilations for {self.total_heads} heads")
        # This rank's heads, by global head index.
        self.dilations = dilations[self.first_head:self.first_head + self.heads_per_rank]
        self.global_positions = options.global_positions()
        # This rank's heads grouped by dilation: each group is computed in one call.
        self.dilation_groups: dict[int, list[int]] = {}
        for i, d in enumerate(self.dilations):
            self.dilation_groups.setdefault(d, []).append(i)

    @property
    def kv_cache(self) -> bool:  # type: ignore[override]  # a property here; other kinds set the class attribute
        """Generation keeps the keys of the widest window (global tokens: recomputed instead)."""
        return not self.global_positions

    def cache_visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = q_pos[:, None] - k_pos[None, :]  # [n, m]
        d = torch.tensor(self.dilations, device=q_pos.device).view(-1, 1, 1)
        return (distance >= 0) & (distance % d == 0) & (distance < self.window * d)

    def cache_keep(self, k_pos: torch.Tensor, next_pos: int) -> torch.Tensor:
        return k_pos > next_pos - self.window * max(self.dilations)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        fused = kernels.use_kernels(q, dropout=self.active_dropout)  # Triton on CUDA (megalong/kernels)
        (q, k, v), (qg, kg, vg), g = self.split_global_heads(q, k, v)
        # The kernel takes float32 slopes; the torch path biases in the inputs' dtype.
        slopes = self.alibi_slopes(q.device, torch.float32 if fused else q.dtype) if self.alibi else None
        window = partial(self._window_on_kernel if fused else self._window, segment_ids=segment_ids)
        buckets = self.head_buckets(q.shape[1], k.shape[1])
        if len(buckets) == 1:
            out = window(q, k, v, buckets[0][0], slopes, g)
        else:
            out = torch.empty_like(q)
            for d, heads, groups in buckets:
                idx = torch.tensor(heads, device=q.device)
                kv = torch.tensor(groups, device=q.device)
                part = window(q[:, idx], k[:, kv], v[:, kv], d, None if slopes is None else slopes[idx], g)
                out = out.index_copy(1, idx, part)
        if len(g):
            rows = partial(self._global_rows_on_kernel if fused else self._global_rows, segment_ids=segment_ids)
            out = out.index_copy(2, g, rows(qg, kg, vg, g, slopes))
        return out

    attend_documents = attend  # one implementation serves packed documents too

    def head_buckets(self, heads: int, groups: int) -> list[tuple[int, list[int], list[int]]]:
        """(dilation, query heads, their key/value groups) per call: the heads of one dilation,
        split so that every group of a call serves the same number of its query heads (a group's
        heads may have different dilations), query heads ordered by group. One bucket, all heads
        in order, when every head has one dilation."""
        per_group = heads // groups
        buckets = []
        for d, members in self.dilation_groups.items():
            by_group: dict[int, list[int]] = {}
            for i in members:
                by_group.setdefault(i // per_group, []).append(i)
            by_count: dict[int, list[int]] = {}
            for group, its_heads in by_group.items():
                by_count.setdefault(len(its_heads), []).append(group)
            for kv in by_count.values():
                buckets.append((d, [i for group in kv for i in by_group[group]], kv))
        return buckets

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's chunk with the halo of (window - 1) x dilation keys and values before it,
        received from the previous rank(s) (context_attention.py): `attend` on halo + chunk, the
        chunk's outputs kept (the halo's queries are zeros, their outputs dropped). Distances are
        relative, so the dilation phase and ALiBi follow. Global tokens: their ordinary keys and
        values all-gathered (every later query sees them), their own rows attended over every
        rank's chunk and merged by log-sum-exp (context_attention.global_token_rows)."""
        halo = (self.window - 1) * max(self.dilations)
        (q, k, v), (qg, kg, vg), _ = self.split_global_heads(q, k, v)
        kvh, need = context_attention.with_halo(torch.stack([k, v]), halo, 3)  # one message for both
        kh, vh = kvh.unbind(0)
        qh = torch.cat([q.new_zeros(*q.shape[:2], need, q.shape[3]), q], dim=2)
        seg_h = None
        if segment_ids is not None:
            seg_h, _ = context_attention.with_halo(segment_ids, halo, 1, differentiable=False)
        if not self.global_positions:
            return self.attend(qh, kh, vh, seg_h)[:, :, need:]
        if self.active_dropout:
            raise NotImplementedError("local attention: global_tokens with parallel.context > 1 need "
                                      "model.attention_dropout: 0")
        C, r = q.shape[2], context_rank()
        positions = [p for p in self.global_positions if p < C * context_size()]
        k_glob = context_attention.gather_global_rows(k, positions, 2)  # their ordinary keys
        v_glob = context_attention.gather_global_rows(v, positions, 2)
        seg_glob = None if segment_ids is None else context_attention.gather_global_rows(segment_ids, positions, 1)
        g = torch.tensor(positions, dtype=torch.long, device=q.device)
        slopes = self.alibi_slopes(q.device, q.dtype) if self.alibi else None
        out = torch.empty_like(qh)
        for d, heads, groups in self.head_buckets(qh.shape[1], kh.shape[1]):
            idx = torch.tensor(heads, device=q.device)
            kv = torch.tensor(groups, device=q.device)
            part = self._window(qh[:, idx], kh[:, kv], vh[:, kv], d, None if slopes is None else slopes[idx], g,
                                seg_h, (k_glob[:, kv], v_glob[:, kv], seg_glob), r * C - need)
            out = out.index_copy(1, idx, part)
        out = out[:, :, need:]
        rows = context_attention.global_token_rows(qg, kg, vg, positions, self.scale, slopes, segment_ids)
        # The same operations on every rank (an empty index where it holds no global token), so
        # that every rank's backward runs its collectives in the same order.
        own = torch.tensor([i for i, p in enumerate(positions) if r * C <= p < (r + 1) * C],
                           dtype=torch.long, device=q.device)
        return out.index_copy(2, g[own] - r * C, rows.index_select(2, own))

    def _window_on_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int,
                          slopes: Optional[torch.Tensor], g: torch.Tensor,
                          segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`_window` on the windowed kernel (the global tokens' keys included)."""
        return window_kernel(q, k, v, self.scale, self.window, d, slopes, g if len(g) else None,
                             segment_ids=segment_ids)

    def _global_rows_on_kernel(self, qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, g: torch.Tensor,
                               slopes: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor] = None
                               ) -> torch.Tensor:
        """`_global_rows` on the windowed kernel: full causal rows at the positions g."""
        return window_kernel(qg[:, :, g], kg, vg, self.scale, None, 1, slopes, None, g, segment_ids)

    def split_global_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """((q, k, v) of the local heads, (q, k, v) of the global-projection heads or Nones, the
        global positions inside this sequence as a tensor). Shared by the torch and kernel paths."""
        h = self.heads_per_rank
        glob = (None, None, None)
        if self.global_positions:
            if q.shape[1] != 2 * h or k.shape[1] % 2:
                raise ValueError("local attention with global_tokens expects the local and the global "
                                 f"heads ({2 * h}), got {q.shape[1]}: use LocalSelfAttention")
            groups = k.shape[1] // 2  # key/value groups: the local ones, then the global ones
            (q, qg), (k, kg), (v, vg) = q.split(h, 1), k.split(groups, 1), v.split(groups, 1)
            glob = (qg, kg, vg)
        L = q.shape[2]
        g = torch.tensor([p for p in self.global_positions if p < L], dtype=torch.long, device=q.device)
        return (q, k, v), glob, g

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int,
                slopes: Optional[torch.Tensor], g: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None,
                global_kv: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
                offset: int = 0) -> torch.Tensor:
        """Dilated sliding window (plus the global tokens' keys) for heads of one dilation d; with
        segment_ids [b, L], pairs of one document only. k, v may hold key/value groups (grouped.py).
        `global_kv`: the global tokens' keys, values and segment ids given (at the true positions g)
        instead of taken from k and v, the queries standing at `offset` + their index (context
        parallelism)."""
        b, h, L, e = q.shape
        groups = k.shape[1]
        device = q.device
        sub = -(-L // d)  # length of each of the d interleaved sub-sequences
        block = min(self.window, sub)
        n = -(-sub // block)

        def fold(x: torch.Tensor) -> torch.Tensor:  # [b, h, L, e] -> [b, h, d, n, block, e]
            lead, last = x.shape[:2], x.shape[-1]
            x = F.pad(x, (0, 0, 0, sub * d - L)).view(*lead, sub, d, last).transpose(2, 3)
            return F.pad(x, (0, 0, 0, n * block - sub)).reshape(*lead, d, n, block, last)

        def with_previous(x: torch.Tensor) -> torch.Tensor:  # keys of the block before, then its own
            return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :, :n], x], dim=4)

        qb = fold(q)
        kb, vb = with_previous(fold(k)), with_previous(fold(v))
        t_q = torch.arange(n * block, device=device).view(n, block, 1)  # index in the sub-sequence
        t_k = ((torch.arange(n, device=device) - 1) * block).view(n, 1, 1) + torch.arange(2 * block, device=device)
        steps = t_q - t_k
        visible = ((steps >= 0) & (steps < self.window) & (t_k >= 0)).expand(d, n, block, 2 * block)
        distance = (steps * d).expand(d, n, block, 2 * block)
        if len(g):
            # Global tokens' ordinary keys and values, seen by every later query outside its window.
            pos = offset + torch.arange(d, device=device).view(d, 1, 1, 1) + d * t_q  # true query position
            gap = pos - g  # [d, n, block, |G|]
            in_window = (gap % d == 0) & (gap < self.window * d)
            visible = torch.cat([(gap >= 0) & ~in_window, visible], dim=-1)
            distance = torch.cat([gap, distance], dim=-1)
            k_glob, v_glob = (k[:, :, g], v[:, :, g]) if global_kv is None else global_kv[:2]
            kg = k_glob.view(b, groups, 1, 1, len(g), e).expand(-1, -1, d, n, -1, -1)
            vg = v_glob.view(b, groups, 1, 1, len(g), e).expand(-1, -1, d, n, -1, -1)
            kb, vb = torch.cat([kg, kb], dim=4), torch.cat([vg, vb], dim=4)
        if segment_ids is not None:  # folded like the queries and keys; padding is never visible
            seg = segment_ids.view(b, 1, L, 1)
            seg_q, seg_k = fold(seg)[..., 0], with_previous(fold(seg))[..., 0]  # [b, 1, d, n, block (x2)]
            same = same_document(seg_q, seg_k)
            if len(g):
                seg_g = segment_ids[:, g] if global_kv is None or global_kv[2] is None else global_kv[2]
                same = torch.cat([same_document(seg_q, seg_g.view(b, 1, 1, 1, -1)), same], dim=-1)
            visible = visible & same  # [b, 1, d, n, block, keys]
        if slopes is None:
            mask = visible
        else:
            bias = alibi_bias(slopes, distance).unsqueeze(0)
            mask = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        out = grouped_sdpa(qb, kb, vb, mask, self.active_dropout, self.scale)
        out = out.reshape(b, h, d, n * block, e)[:, :, :, :sub].transpose(2, 3)
        return out.reshape(b, h, sub * d, e)[:, :, :L]

    def _global_rows(self, qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, g: torch.Tensor,
                     slopes: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows of the global tokens: causal attention over the whole sequence (their document's
        with segment_ids), global projections."""
        L = kg.shape[2]
        distance = g.view(-1, 1) - torch.arange(L, device=g.device)  # [|G|, L]
        visible = distance >= 0
        if segment_ids is not None:
            visible = (visible & same_document(segment_ids[:, g], segment_ids)).unsqueeze(1)  # [b, 1, |G|, L]
        if slopes is None:
            mask = visible
        else:
            bias = alibi_bias(slopes, distance).unsqueeze(0)
            mask = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        return grouped_sdpa(qg[:, :, g], kg, vg, mask, self.active_dropout, self.scale)


class LocalSelfAttention(SelfAttention):
    """megatron's SelfAttention plus, when the layer has global tokens, Longformer's second set of
    projections `linear_qkv_global` (same shape and tensor-parallel split as `linear_qkv`, and
    initialised as a copy of it). Its heads are handed to the core attention after the local heads,
    so that RoPE (applied per head by position) rotates both. Without global tokens it is exactly
    megatron's SelfAttention."""

    def __init__(self, config: Any, submodules: Any, layer_number: int, attn_mask_type: Any = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        params = getattr(submodules.core_attention, "params", None) or {}
        options = params.get("options")
        self.has_global_tokens = bool(options is not None and options.global_tokens)
        if not self.has_global_tokens:
            return
        if self.config.num_query_groups < self.world_size or config.attention_output_gate:
            raise ValueError("local attention global_tokens: fewer query groups than tensor-parallel "
                             "ranks and output gates are not supported")
        self.linear_qkv_global = submodules.linear_qkv(
            self.config.hidden_size, self.linear_qkv_out_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False,
            bias=self.config.add_bias_linear or self.config.add_qkv_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv_global", tp_group=self.pg_collection.tp)
        with torch.no_grad():
            for name, param in self.linear_qkv.named_parameters():
                dict(self.linear_qkv_global.named_parameters())[name].copy_(param)

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: Any = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        local = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        if not self.has_global_tokens:
            return local
        if output_gate or not split_qkv:
            raise ValueError("local attention global_tokens: fused qkv rope is not supported")
        mixed, _ = self.linear_qkv_global(hidden_states)
        groups = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups
        d = self.hidden_size_per_attention_head
        mixed = mixed.view(*mixed.shape[:2], groups, (per_group + 2) * d)
        query, key, value = torch.split(mixed, [per_group * d, d, d], dim=3)
        query = query.reshape(*query.shape[:2], -1, d)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return tuple(torch.cat([a, b], dim=2) for a, b in zip(local, (query, key, value)))
