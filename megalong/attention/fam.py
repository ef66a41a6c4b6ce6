"""`fam` (TransformerFAM, Hwang et al. 2024): block sliding-window attention with feedback memory.

The sequence is cut into blocks of `block_size`. Per layer, block t's tokens attend to the
`memory_segments` previous blocks in full, to the layer's feedback memory F_{t-1} (`fam_length`
tokens) and to their own block causally. The FAM queries (computed from F_{t-1}) attend to F_{t-1}
and the whole block t; the result passes the layer's residual, MLP and norms like any token and
becomes F_t, carried to block t+1 of the same layer. F_{-1} is a learned embedding per layer. No
projection weights are added: FAM tokens use the layer's own. Gradients flow through the memory
blocks and through the whole FAM chain.

Computation: the FAM chain is the only sequential part (fam_length tokens per block); all block
tokens then attend in parallel, O(L * ((memory_segments + 1) * block_size + fam_length)).

ALiBi distances: F_t stands at the last position of block t (the initial FAM at position -1), so
a token at position p of block t is at distance p - (t * block_size - 1) from F_{t-1}, and the FAM
queries that produce F_t are at position (t + 1) * block_size - 1 (distance block_size from F_{t-1}).

Packed documents (segment ids, megalong/attention/segments.py): blocks stay those of the packed
row. A token sees memory and own-block tokens of its document only, and F_{t-1} only when F_{t-1}
belongs to its document; a document that starts inside block t sees the initial FAM instead (its
keys from the learned embeddings, standing at the document's first position - 1). F_t belongs to
the document of block t's last token: it continues F_{t-1} when that document did, else restarts
from the initial FAM, and reads only that document's tokens of block t. A document that starts at
a block boundary is thus computed exactly as if alone (tested). The block kernel takes the same
documents (megalong/kernels/fam_attention.py); the FAM chain stays in torch.

Grouped-query attention: keys and values stay one head per group ([b, groups, ...]); the block
kernel indexes the groups, the torch paths copy them per query head.

Context parallelism (`parallel.context`): the memory by a halo from the earlier ranks, the FAM
state handed from rank to rank, serially (context_fam.py, which states the cost); packed documents
too, the chain's restarts the same function as here (fam_chain.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from megatron.core.transformer.transformer_layer import TransformerLayer

from megalong.attention import context_fam
from megalong.attention.fam_chain import FamDocuments, chain_documents, fam_chain
from megalong.attention.alibi import alibi_bias
from megalong.attention.base import CoreAttention
from megalong.attention.grouped import grouped_sdpa
from megalong.attention.options import FamOptions
from megalong.attention.segments import document_positions, same_document, segments_of
from megalong.kernels import select as kernels
from megalong.parallel.context import context_size

QKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@kernels.eager
def fam_blocks_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_fam: Optional[torch.Tensor],
                      v_fam: Optional[torch.Tensor], scale: float, block_size: int, memory_segments: int,
                      slopes: Optional[torch.Tensor], documents: Optional[FamDocuments] = None) -> torch.Tensor:
    """`FamAttention.blocks` on the FAM block kernel (megalong/kernels/fam_attention.py), packed
    documents included; k, v, k_fam, v_fam may hold key/value groups (the kernel indexes them). The
    FAM chain's `fam_step` stays in torch."""
    from megalong.kernels.fam_attention import fam_block_attention

    if documents is None:
        return fam_block_attention(q, k, v, k_fam, v_fam, scale, block_size, memory_segments, slopes)
    return fam_block_attention(q, k, v, k_fam, v_fam, scale, block_size, memory_segments, slopes,
                               segment_ids=documents.segment_ids, fam_docs=documents.fam_docs,
                               k_init=documents.k_init, v_init=documents.v_init)


class FamAttention(CoreAttention):
    """The attention of a `fam` layer; run by `FamTransformerLayer` (or `run_fam_layer`), which
    hands it queries, keys and values of block tokens and of FAM tokens on [b, heads, s, d]."""

    options_class = FamOptions
    options: FamOptions
    grouped_kv = True  # every path takes the key/value groups (the torch one via grouped.py)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        o = self.options
        self.block_size, self.memory_segments, self.fam_length = o.block_size, o.memory_segments, o.fam_length

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("fam attention needs its FAM tokens: it runs inside FamTransformerLayer "
                           "(the registry's layer for `fam`), not in megatron's TransformerLayer")

    def attend_documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor) -> torch.Tensor:
        """Packed documents run in FamTransformerLayer too (`fam_block_context(..., segment_ids)`)."""
        return self.attend(q, k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                distance: torch.Tensor) -> torch.Tensor:
        if self.alibi and visible.dim() == q.dim():  # per batch row (packed documents): [b, 1, ..., keys]
            bias = -self.alibi_slopes(q.device, q.dtype).view(1, -1, *[1] * (q.dim() - 2)) * distance.to(q.dtype)
            mask = torch.where(visible, bias, torch.full_like(bias, float("-inf")))
        elif self.alibi:
            mask = alibi_bias(self.alibi_slopes(q.device, q.dtype), distance)
            mask = mask.masked_fill(~visible, float("-inf"))  # [h, ...] aligns with q's heads
        else:
            mask = visible
        # k, v may hold key/value groups: the group's query heads are stacked along the rows
        return grouped_sdpa(q, k, v, mask, self.active_dropout, self.scale)

    def fam_step(self, q_fam: torch.Tensor, k_fam: torch.Tensor, v_fam: torch.Tensor,
                 k_block: torch.Tensor, v_block: torch.Tensor, block_visible: Optional[torch.Tensor] = None,
                 fam_distance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """FAM queries over [previous FAM; the whole current block]: [b, h, fam_length, d].
        Packed documents: block_visible [b, B], the block's tokens of F_t's document; fam_distance
        [b], the FAM queries' distance to the FAM keys (block_size, or from the document's start)."""
        B, Fl = k_block.shape[2], k_fam.shape[2]
        keys, values = torch.cat([k_fam, k_block], dim=2), torch.cat([v_fam, v_block], dim=2)
        to_block = self.block_size - 1 - torch.arange(B, device=q_fam.device)
        if block_visible is None or fam_distance is None:
            distance = torch.cat([torch.full((Fl,), self.block_size, device=q_fam.device), to_block])
            distance = distance.expand(Fl, -1)
            return self._attend(q_fam, keys, values, torch.ones_like(distance, dtype=torch.bool), distance)
        b = k_block.shape[0]
        visible = torch.cat([torch.ones(b, Fl, dtype=torch.bool, device=q_fam.device), block_visible], dim=1)
        distance = torch.cat([fam_distance.view(b, 1).expand(b, Fl), to_block.expand(b, B)], dim=1)
        return self._attend(q_fam, keys, values, visible.view(b, 1, 1, -1).expand(b, 1, Fl, -1),
                            distance.view(b, 1, 1, -1).expand(b, 1, Fl, -1))

    def blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_fam: Optional[torch.Tensor], v_fam: Optional[torch.Tensor],
               documents: Optional[FamDocuments] = None) -> torch.Tensor:
        """Every block's tokens over [memory blocks; FAM before the block; own block, causally].

        q: [b, h, L, d]; k, v: [b, g, L, d] (g key/value groups dividing h, indexed by group on
        both paths); k_fam, v_fam: [b, g, blocks, fam_length, d] (F_{t-1} for block t) or None
        without FAM; `documents`: packed documents (the module docstring). Returns [b, h, L, d].
        """
        if kernels.use_kernels(q, dropout=self.active_dropout):  # Triton on CUDA (megalong/kernels)
            slopes = self.alibi_slopes(q.device, torch.float32) if self.alibi else None
            return fam_blocks_kernel(q, k, v, k_fam, v_fam, self.scale, self.block_size, self.memory_segments,
                                     slopes, documents)
        b, h, L, d = q.shape
        B, m = self.block_size, self.memory_segments
        n = -(-L // B)
        pad = n * B - L

        def blocked(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0, 0, pad)).view(b, x.shape[1], n, B, d)

        qb, kb, vb = blocked(q), blocked(k), blocked(v)
        fam_len = 0 if k_fam is None else k_fam.shape[3]
        device = q.device
        i = torch.arange(B, device=device)
        t = torch.arange(n, device=device).view(n, 1, 1)
        key_parts, value_parts, visible, distance = [], [], [], []
        docs = documents
        seg = None if docs is None else F.pad(docs.segment_ids, (0, pad), value=-1).view(b, 1, n, B)

        def part(vis: torch.Tensor, same: Optional[torch.Tensor], dist: torch.Tensor) -> None:
            """[n, B, keys] visibility and distances; with documents [b, 1, n, B, keys], same-document only."""
            if same is not None:
                vis = vis & same
                dist = dist.expand(vis.shape)
            visible.append(vis)
            distance.append(dist)

        for s in range(m, 0, -1):  # block t - s, seen in full when it exists
            key_parts.append(F.pad(kb, (0, 0, 0, 0, s, 0))[:, :, :n])
            value_parts.append(F.pad(vb, (0, 0, 0, 0, s, 0))[:, :, :n])
            part((t >= s).expand(n, B, B),
                 None if seg is None else same_document(seg, F.pad(seg, (0, 0, s, 0), value=-1)[:, :, :n]),
                 (s * B + i.view(B, 1) - i.view(1, B)).expand(n, B, B))
        if fam_len:
            assert k_fam is not None and v_fam is not None
            key_parts.append(k_fam)
            value_parts.append(v_fam)
            everyone = torch.ones(n, B, fam_len, dtype=torch.bool, device=device)
            continued = None if seg is None or docs is None else (seg == docs.fam_docs.view(b, 1, n, 1)).unsqueeze(-1)
            part(everyone, continued, (i.view(B, 1) + 1).expand(n, B, fam_len))
            if docs is not None and continued is not None:  # the initial FAM, for documents started in the block
                assert docs.k_init is not None and docs.v_init is not None
                key_parts.append(docs.k_init.unsqueeze(2).expand(-1, -1, n, -1, -1))
                value_parts.append(docs.v_init.unsqueeze(2).expand(-1, -1, n, -1, -1))
                in_document = F.pad(document_positions(docs.segment_ids), (0, pad)).view(b, 1, n, B, 1)
                part(everyone, ~continued, (in_document + 1).expand(b, 1, n, B, fam_len))
        key_parts.append(kb)
        value_parts.append(vb)
        own = i.view(B, 1) - i.view(1, B)
        part((own >= 0).expand(n, B, B), None if seg is None else same_document(seg, seg), own.expand(n, B, B))
        out = self._attend(qb, torch.cat(key_parts, dim=3), torch.cat(value_parts, dim=3),
                           torch.cat(visible, dim=-1), torch.cat(distance, dim=-1))
        return out.reshape(b, h, n * B, d)[:, :, :L]


def run_fam_layer(x: torch.Tensor, fam_init: Optional[torch.Tensor], attention: FamAttention, qkv: QKV,
                  attention_residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  mlp_residual: Callable[[torch.Tensor], torch.Tensor],
                  segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One FAM transformer layer on x [s, b, hidden]; returns the block tokens' output [s, b, hidden].

    qkv(h): input norm and projection, h [s, b, hidden] -> q, k, v [s, b, heads, d];
    attention_residual(context [s, b, heads * d], residual) -> residual + output projection;
    mlp_residual(h) -> h + MLP(norm(h)). Both megatron's layer and an export use this function.
    segment_ids [b, s]: packed documents (the module docstring).
    """
    context = fam_block_context(x, fam_init, attention, qkv, attention_residual, mlp_residual, segment_ids)
    return mlp_residual(attention_residual(context, x))


def fam_block_context(x: torch.Tensor, fam_init: Optional[torch.Tensor], attention: FamAttention, qkv: QKV,
                      attention_residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      mlp_residual: Callable[[torch.Tensor], torch.Tensor],
                      segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention context of x's block tokens, [s, b, heads * d], before the output projection.

    The FAM chain (FAM tokens through attention, residual and MLP, block by block) runs in here:
    the context is a function of x and the layer's weights alone, which is what lets a reversible
    stack use it as its attention half (megalong/model/reversible.py)."""
    s, b, _ = x.shape
    B = attention.block_size
    n = -(-s // B)

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [s, b, h, d] -> [b, h, s, d]
        return t.permute(1, 2, 0, 3)

    def tokens_first(t: torch.Tensor) -> torch.Tensor:  # [b, h, s, d] -> [s, b, h * d]
        return t.permute(2, 0, 1, 3).flatten(2)

    def advance(context: torch.Tensor, fam: torch.Tensor) -> torch.Tensor:  # F_t from its queries' context
        return mlp_residual(attention_residual(tokens_first(context), fam))

    def grouped(h: torch.Tensor):  # k, v: the key/value groups, never copied per query head
        q, k, v = (heads_first(t) for t in qkv(h))
        return q, k, v

    if context_size() > 1:  # this rank's chunk of blocks, the FAM state from the rank before (context_fam.py);
        # the halo carries the key/value groups too
        return tokens_first(context_fam.fam_context(x, fam_init, attention, grouped, advance, segment_ids))
    q, k, v = grouped(x)
    k_fam = v_fam = None
    documents = chain = None
    if segment_ids is not None:
        chain = chain_documents(segment_ids, B, segment_ids[:, 0])
        documents = FamDocuments(segment_ids, chain.fam_docs)
    if fam_init is not None:
        initial = fam_init.unsqueeze(1).expand(-1, b, -1)
        start = None
        if documents is not None:
            start = (initial, grouped(initial))
            documents.k_init, documents.v_init = start[1][1], start[1][2]
        k_fam, v_fam, _ = fam_chain(initial, attention, grouped, advance, k, v, n - 1, chain, start)
    return tokens_first(attention.blocks(q, k, v, k_fam, v_fam, documents))


class FamTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer for `fam`: its norms, projections and MLP, run block by block
    with the layer's feedback memory (`run_fam_layer`). Adds one parameter, `fam_init`
    [fam_length, hidden] (absent when fam_length is 0: plain block sliding-window attention)."""

    def __init__(self, config: Any, submodules: Any, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection: Any = None, vp_stage: Optional[int] = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        core = self.self_attention.core_attention
        if not isinstance(core, FamAttention):
            raise TypeError(f"FamTransformerLayer needs FamAttention as core attention, got {type(core).__name__}")
        if core.fam_length > 0:
            self.fam_init: Optional[nn.Parameter] = nn.Parameter(torch.empty(core.fam_length, config.hidden_size))
            config.init_method(self.fam_init.data)
        else:
            self.fam_init = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, rotary_pos_emb: Any = None,
                inference_context: Any = None, packed_seq_params: Any = None, **unused: Any):
        _check_inputs(attention_mask, rotary_pos_emb, inference_context)
        qkv, attention_residual = self._fam_functions()
        output = run_fam_layer(hidden_states, self.fam_init, self.self_attention.core_attention, qkv,
                               attention_residual, lambda h: self._forward_mlp(h), segments_of(packed_seq_params))
        return output, context

    def forward_attention_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """x + Attention(x) for the block tokens, as in `forward` before its MLP."""
        qkv, attention_residual = self._fam_functions()
        context = fam_block_context(hidden_states, self.fam_init, self.self_attention.core_attention, qkv,
                                    attention_residual, lambda h: self._forward_mlp(h))
        return attention_residual(context, hidden_states)

    def reversible_attention(self, hidden_states: torch.Tensor, attention_mask: Any = None,
                             rotary_pos_emb: Any = None, packed_seq_params: Any = None, **unused: Any):
        """The attention half F of a reversible pair: (output projection, bias) of the block tokens'
        context; the FAM chain, with its own residuals and MLP, runs inside (a function of
        `hidden_states` only, so y1 = x1 + F(x2) stays invertible)."""
        _check_inputs(attention_mask, rotary_pos_emb, None)
        qkv, attention_residual = self._fam_functions()
        context = fam_block_context(hidden_states, self.fam_init, self.self_attention.core_attention, qkv,
                                    attention_residual, lambda h: self._forward_mlp(h),
                                    segments_of(packed_seq_params))
        return self.self_attention.linear_proj(context)

    def _fam_functions(self):
        attn = self.self_attention

        def qkv(h: torch.Tensor):
            query, key, value = attn.get_query_key_value_tensors(self.input_layernorm(h))
            return query, key, value

        def attention_residual(ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            with self.bias_dropout_add_exec_handler():
                return self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                    attn.linear_proj(ctx), residual, self.hidden_dropout)

        return qkv, attention_residual


def _check_inputs(attention_mask: Any, rotary_pos_emb: Any, inference_context: Any) -> None:
    if attention_mask is not None:
        raise ValueError("fam builds its mask from positions; pass attention_mask=None to the model")
    if rotary_pos_emb is not None:
        raise ValueError("fam layers do not support rotary embeddings (FAM tokens have no position)")
    if inference_context is not None:
        raise NotImplementedError("fam layers: megatron inference contexts")
