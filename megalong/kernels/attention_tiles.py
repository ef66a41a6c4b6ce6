"""Tile steps shared by the windowed and FAM attention kernels: scores, an online-softmax forward
step and a backward step over one tile of keys.

Scores are in the log2 domain (scale and ALiBi times log2(e)). `DOT_PRECISION` is every `tl.dot`'s
input_precision (`megalong.kernels.tuning.dot_input_precision` of the operands' dtype). The
backward step writes dq's contribution to the caller's accumulator and accumulates dk, dv with
float32 atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def tile_scores(q, k, pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Scores in the log2 domain, -inf where not visible."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_ALIBI:
        s -= slope * 1.4426950408889634 * (pos_q[:, None] - pos_k[None, :]).to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def forward_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_mask, pos_q, pos_k, visible, slope, qk_scale,
                 HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: (acc, running max, running sum) after the keys at k_ptrs."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tile_scores(q, k, pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI, DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def backward_tile(dq, q, do, lse2, delta, K_ptrs, V_ptrs, DK_ptrs, DV_ptrs, kv_mask,
                  pos_q, pos_k, visible, slope, qk_scale, sm_scale, HAS_ALIBI: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """dq after the keys at K_ptrs; their dk, dv contributions added atomically."""
    k = tl.load(K_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V_ptrs, mask=kv_mask, other=0.0)
    s = tile_scores(q, k, pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI, DOT_PRECISION)
    p = tl.exp2(s - lse2[:, None])  # 0 where not visible
    tl.atomic_add(DV_ptrs, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION),
                  mask=kv_mask)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(tl.float32)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
    tl.atomic_add(DK_ptrs, tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * sm_scale,
                  mask=kv_mask)
    return dq
