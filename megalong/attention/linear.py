"""`linear`: causal linear attention, O(L) time and memory, with a recurrent form for generation.

`normalization: elu` (Katharopoulos et al. 2020): with phi(x) = elu(x) + 1,

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),  S_i = sum_{j<=i} phi(k_j) v_j^T,  z_i = sum_{j<=i} phi(k_j).

`normalization: efficient` (Shen et al. 2021, made causal): queries are normalised by a softmax
over their features, keys by a softmax over the positions seen so far, feature by feature:

    out_i = sum_f softmax(q_i)_f * sum_{j<=i} exp(k_jf) v_j / sum_{j<=i} exp(k_jf).

Both are computed in chunks of `chunk_size` positions: quadratic only inside a chunk, with the
prefix sums (the state) carried from chunk to chunk, so time and memory grow linearly in L. The
exponentials of `efficient` are taken relative to a running per-feature maximum of the keys seen so
far (detached; it cancels between numerator and denominator), so nothing depends on a later token.
Within a chunk one maximum serves all positions: a key feature that rises by more than ~80 (float32;
~700 in float64) inside one chunk underflows the earlier positions' sums; the token-by-token
`step` has no such limit.

Generation: `init_state(batch, heads, head_dim, device, dtype)` gives the empty state and
`step(q, k, v, state) -> (out, state)` on [batch, heads, 1, head_dim] runs one token; a sequence of
steps equals the parallel form. Attention scale, dropout and ALiBi do not apply (no scores).

Packed documents (`attend_documents`, linear_documents.py): the state and the normaliser restart
at every document start, in the chunked torch forms (the kernel takes no segment ids); in the
recurrent form, `linear_documents.restart_state` before a document's first token.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megalong.attention import context_attention
from megalong.attention.base import CoreAttention
from megalong.attention.grouped import stack_heads, unstack_heads
from megalong.attention.linear_documents import segmented_efficient_attention, segmented_linear_attention
from megalong.attention.options import LinearOptions
from megalong.kernels import select as kernels
from megalong.kernels.linear_reference import causal_linear_attention, elu_feature_map
from megalong.kernels.tuning import linear_kernel_covers

State = tuple[torch.Tensor, ...]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def efficient_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Shen et al.'s causal efficient attention on one chunk, q [b, h, C, d], k and v [b, g, C, d]
    (g key/value groups dividing h), carrying state = (N [b, g, d, e], D [b, g, d], m [b, g, d]):
    sums of exp(k - m) v^T and exp(k - m), one per group (the query heads of a group share them,
    stacked along the rows: grouped.py)."""
    N, D, m = state
    heads, groups = q.shape[1], k.shape[1]
    m_new = torch.maximum(m, k.amax(dim=2)).detach()
    rescale = torch.exp(m - m_new)  # 0 for the empty state (m = -inf)
    N, D = N * rescale.unsqueeze(-1), D * rescale
    w = torch.exp(k - m_new.unsqueeze(2))  # [b, g, C, d]
    prefix = D.unsqueeze(2) + torch.cumsum(w, dim=2)  # sum_{j<=i} exp(k_j - m), per feature
    j = heads // groups
    q_over = stack_heads(torch.softmax(q, dim=-1), groups) / prefix.repeat(1, 1, j, 1)  # [b, g, j * C, d]
    C = q.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril().repeat(j, 1)
    A = torch.matmul(q_over, w.transpose(-1, -2)).masked_fill(~causal, 0.0)
    out = unstack_heads(torch.matmul(A, v) + torch.matmul(q_over, N), heads)
    return out, (N + torch.matmul(w.transpose(-1, -2), v), D + w.sum(dim=2), m_new)


def efficient_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State,
                     chunk_size: int) -> torch.Tensor:
    """`efficient_chunk` over the whole sequence, chunk after chunk, starting from `state`."""
    outs = []
    for start in range(0, q.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        out, state = efficient_chunk(q[:, :, part], k[:, :, part], v[:, :, part], state)
        outs.append(out)
    return torch.cat(outs, dim=2)


@kernels.eager
def elu_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, chunk_size: int,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`causal_linear_attention` (or, with segment_ids, `segmented_linear_attention`) with
    phi = elu + 1 on the chunked kernel (megalong/kernels/linear_attention.py); k and v may hold
    key/value groups (the kernel indexes them)."""
    from megalong.kernels.linear_attention import linear_attention

    return linear_attention(q, k, v, eps, chunk_size, segment_ids)


class LinearAttention(CoreAttention):
    options_class = LinearOptions
    options: LinearOptions
    # Every torch path keeps one state per key/value group (the query heads of a group stacked
    # along the rows, grouped.py); the elu kernel indexes the groups itself.
    grouped_kv = True
    grouped_context = True  # attend_context too: the context exchanges carry the groups

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        normalization, eps, chunk_size = self.options.normalization, self.options.eps, self.options.chunk_size
        if normalization not in ("elu", "efficient"):
            raise ValueError(f"linear attention: unknown normalization '{normalization}'")
        if self.alibi:
            raise ValueError("linear attention has no attention scores for ALiBi to bias")
        self.normalization, self.eps, self.chunk_size = normalization, eps, chunk_size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # `elu` has a kernel (Triton on CUDA, megalong/kernels); `efficient` always runs in torch.
        fused = (self.normalization == "elu" and kernels.use_kernels(q)
                 and linear_kernel_covers(q.dtype, q.shape[-1], v.shape[-1]))
        if fused:  # 16-bit operands go in as they are (the kernel accumulates in float32)
            return elu_kernel(q, k.to(q.dtype), v.to(q.dtype), self.eps, self.chunk_size).to(v.dtype)
        dtype = _compute_dtype(q.dtype)
        q, k, v_in = q.to(dtype), k.to(dtype), v
        v = v.to(dtype)
        if self.normalization == "elu":
            out = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, self.eps, self.chunk_size)
        else:
            state = self.init_state(q.shape[0], k.shape[1], q.shape[-1], q.device, dtype, v.shape[-1])
            out = efficient_chunks(q, k, v, state, self.chunk_size)
        return out.to(v_in.dtype)

    def attend_documents(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor) -> torch.Tensor:
        if (self.normalization == "elu" and kernels.use_kernels(q)
                and linear_kernel_covers(q.dtype, q.shape[-1], v.shape[-1])):
            return elu_kernel(q, k.to(q.dtype), v.to(q.dtype), self.eps, self.chunk_size, segment_ids).to(v.dtype)
        dtype = _compute_dtype(q.dtype)
        out_dtype = v.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.normalization == "elu":
            out = segmented_linear_attention(elu_feature_map(q), elu_feature_map(k), v, segment_ids, self.eps,
                                             self.chunk_size)
        else:
            out = segmented_efficient_attention(q, k, v, segment_ids, self.chunk_size)
        return out.to(out_dtype)

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's chunk from the summed states of the earlier ranks (context_attention.py)."""
        dtype = _compute_dtype(q.dtype)
        q, k, v_in = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.normalization == "efficient" and segment_ids is not None:
            out = context_attention.efficient_documents_attention(q, k, v_in, segment_ids, self.chunk_size)
        elif self.normalization == "efficient":
            out = efficient_chunks(q, k, v_in, context_attention.efficient_state_before(k, v_in), self.chunk_size)
        elif segment_ids is None:
            out = context_attention.linear_attention(q, k, v_in, self.eps, self.chunk_size)
        else:
            out = context_attention.linear_documents_attention(q, k, v_in, segment_ids, self.eps, self.chunk_size)
        return out.to(v.dtype)

    def init_state(self, batch: int, heads: int, head_dim: int, device: torch.device,
                   dtype: torch.dtype, value_dim: int | None = None) -> State:
        """The state before the first token (a tuple of tensors; pass it to `step` unchanged);
        `heads`: the key/value heads (groups), which the state is kept for."""
        e = value_dim or head_dim
        dtype = _compute_dtype(dtype)
        S = torch.zeros(batch, heads, head_dim, e, device=device, dtype=dtype)
        z = torch.zeros(batch, heads, head_dim, device=device, dtype=dtype)
        if self.normalization == "elu":
            return S, z
        return S, z, torch.full_like(z, float("-inf"))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: q [b, heads, 1, d], k and v [b, groups, 1, d] -> (out [b, heads, 1, d], new
        state, one per group: `init_state` with the groups). Grouped key/value heads are shared as
        in the parallel form."""
        dtype = state[0].dtype
        out_dtype = v.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.normalization == "efficient":
            out, state = efficient_chunk(q, k, v, state)
            return out.to(out_dtype), state
        S, z = state
        fq, fk = elu_feature_map(q), elu_feature_map(k)
        S = S + torch.matmul(fk.transpose(-1, -2), v)
        z = z + fk.squeeze(2)
        fq = stack_heads(fq, k.shape[1])  # [b, g, heads / g, d]: the group's query heads as rows
        out = torch.matmul(fq, S) / ((fq * z.unsqueeze(2)).sum(-1) + self.eps).unsqueeze(-1)
        return unstack_heads(out, q.shape[1]).to(out_dtype), (S, z)
