"""Windowed flash attention (Triton), forward and backward, beside the torch reference it must equal.

One mask family covers `local` (GPT-Neo window, Longformer dilation and global tokens) and the
global rows of Longformer, with ALiBi folded in. For a query at position i and a key at position j:

    local(i, j)  = j <= i and (i - j) % dilation == 0 and (i - j) < window * dilation
    global(i, j) = j in global_keys and j <= i            (keys every later query sees)
    visible      = local or global,      score = scale * q.k - slope_h * (i - j)

`q_positions` (dilation 1, no global keys) gives queries at arbitrary positions, e.g. the rows of
Longformer's global tokens: causal over the whole sequence when `window` is None.

The kernel walks, per block of queries, only the key tiles that can hold a visible key: with
dilation d the sequence is read as d interleaved sub-sequences (positions r, r + d, ...) by strided
loads, so a query block of one residue r visits about window / block_n tiles of its own residue,
then the global keys. Nothing of size L x L exists; time is O(L * (window + |global_keys|)).
Forward returns the output and the log-sum-exp (natural log, float32) of every query row.
The backward kernel recomputes the probabilities from the log-sum-exp; dq is written by its query
block, dk and dv are accumulated with float32 atomics (a key tile is shared by the ~window / block_m
query blocks that see it, and global keys by all of them).

Grouped-query attention: k and v may hold G key/value heads for the H query heads (G divides H);
query head h reads key/value head h // (H / G), indexed in the kernel (never copied per query
head), and dk, dv [b, G, L, D] receive the atomic adds of all the group's query heads: addition in
any order, the same float32 atomics that already join the query blocks.
Dropout is not implemented: callers use the reference when dropout is active.

`segment_ids` [b, L] (packed documents, non-decreasing along a row): a pair is visible only inside
one document, and a query block starts its key walk at the first position of its earliest query's
document, so the key tiles of earlier documents are never read (global attention over documents of
length n costs O(L * n), not O(L^2)).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.attention_tiles import LOG2E, backward_tile, forward_tile
from megalong.kernels.offsets import offset64
from megalong.kernels.tuning import attention_launch_tiles, dot_input_precision


def reference_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               window: Optional[int] = None, dilation: int = 1,
                               slopes: Optional[torch.Tensor] = None,
                               global_keys: Optional[torch.Tensor] = None,
                               q_positions: Optional[torch.Tensor] = None,
                               segment_ids: Optional[torch.Tensor] = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention with an explicit [Lq, L] mask (O(L^2)): returns (out, lse [b, h, Lq]);
    k, v with fewer heads (groups) are repeated per query head here, the obvious form."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    L, Lq = k.shape[2], q.shape[2]
    pos_q = torch.arange(Lq, device=q.device) if q_positions is None else q_positions.to(q.device).long()
    distance = pos_q[:, None] - torch.arange(L, device=q.device)[None, :]
    span = L if window is None else window * dilation
    visible = (distance >= 0) & (distance % dilation == 0) & (distance < span)
    if global_keys is not None and len(global_keys):
        is_global = torch.zeros(L, dtype=torch.bool, device=q.device)
        is_global[global_keys.to(q.device).long()] = True
        visible = visible | (is_global[None, :] & (distance >= 0))
    if segment_ids is not None:  # [b, 1, Lq, L]: one document only
        seg = segment_ids.to(q.device)
        visible = visible & (seg[:, pos_q][:, None, :, None] == seg[:, None, None, :])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).view(-1, 1, 1) * distance.to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out, lse


@triton.jit
def _query_block(QPOS, Lq, L, dilation, pid_m,
                 HAS_QPOS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of this program: (row index in q, true position, index in its residue's sub-sequence,
    residue, valid)."""
    offs = tl.arange(0, BLOCK_M)
    if HAS_QPOS:
        rows = pid_m * BLOCK_M + offs
        valid = rows < Lq
        pos = tl.load(QPOS + rows, mask=valid, other=0)
        r = pid_m * 0
        t = pos
    else:
        r = pid_m % dilation
        t = (pid_m // dilation) * BLOCK_M + offs
        pos = r + dilation * t
        valid = pos < L
        rows = pos
    return rows, pos, t, r, valid


@triton.jit
def _window_fwd(Q, K, V, O, LSE, SLOPES, QPOS, QBOUNDS, GKEYS, SEG, DSTART,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                H, per_group, Lq, L, n_global, window, dilation, qk_scale,
                HAS_ALIBI: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_SEG: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows, pos_q, t_q, r, valid_q = _query_block(QPOS, Lq, L, dilation, pid_m, HAS_QPOS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + offset64(b, sqb) + offset64(h, sqh) + rows[:, None] * sqm + offs_d[None, :],
                mask=valid_q[:, None] & d_mask[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    kv_h = h // per_group  # this query head's key/value head
    K += offset64(b, skb) + offset64(kv_h, skh)
    V += offset64(b, svb) + offset64(kv_h, svh)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Local keys: sub-sequence indices s of residue r within [min t - (window - 1), max t].
    n_sub = (L - r + dilation - 1) // dilation
    if HAS_QPOS:  # [first, last + 1] position of the block's queries, from the host
        t_lo = tl.load(QBOUNDS + 2 * pid_m)
        t_hi = tl.load(QBOUNDS + 2 * pid_m + 1)
    else:
        t_lo = (pid_m // dilation) * BLOCK_M
        t_hi = t_lo + BLOCK_M
    s_lo = tl.maximum(t_lo - (window - 1), 0)
    s_hi = tl.minimum(t_hi, n_sub)
    seg_q = rows * 0
    if HAS_SEG:  # skip the key tiles before the block's earliest document
        seg_q = tl.load(SEG + offset64(b, L) + pos_q, mask=valid_q, other=-1)
        first = tl.min(tl.load(DSTART + offset64(b, L) + pos_q, mask=valid_q, other=L), axis=0)
        s_lo = tl.maximum(s_lo, (first - r + dilation - 1) // dilation)
    for s0 in range(s_lo, s_hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        pos_k = r + dilation * s
        valid_k = s < s_hi
        steps = t_q[:, None] - s[None, :]
        visible = (steps >= 0) & (steps < window) & valid_k[None, :] & valid_q[:, None]
        if HAS_SEG:
            seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
            visible = visible & (seg_q[:, None] == seg_k[None, :])
        kv_mask = valid_k[:, None] & d_mask[None, :]
        acc, m_i, l_i = forward_tile(acc, m_i, l_i, q, K + pos_k[:, None] * skn + offs_d[None, :],
                                  V + pos_k[:, None] * svn + offs_d[None, :], kv_mask,
                                  pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI,
                                  DOT_PRECISION)
    if HAS_GLOBAL:
        # Global keys before the query and not already counted in its window.
        for g0 in range(0, n_global, BLOCK_N):
            gi = g0 + tl.arange(0, BLOCK_N)
            valid_k = gi < n_global
            pos_k = tl.load(GKEYS + gi, mask=valid_k, other=0)
            gap = pos_q[:, None] - pos_k[None, :]
            in_window = (gap % dilation == 0) & (gap < window * dilation)
            visible = (gap >= 0) & ~in_window & valid_k[None, :] & valid_q[:, None]
            if HAS_SEG:
                seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
                visible = visible & (seg_q[:, None] == seg_k[None, :])
            kv_mask = valid_k[:, None] & d_mask[None, :]
            acc, m_i, l_i = forward_tile(acc, m_i, l_i, q, K + pos_k[:, None] * skn + offs_d[None, :],
                                      V + pos_k[:, None] * svn + offs_d[None, :], kv_mask,
                                      pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI,
                                  DOT_PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + offset64(b, sob) + offset64(h, soh) + rows[:, None] * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=valid_q[:, None] & d_mask[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + offset64(bh, Lq) + rows, lse, mask=valid_q)


@triton.jit
def _window_bwd(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, SLOPES, QPOS, QBOUNDS, GKEYS, SEG, DSTART,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                H, per_group, Lq, L, n_global, window, dilation, qk_scale, sm_scale,
                HAS_ALIBI: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_SEG: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq [b, h, Lq, D] float32 written here; dk, dv [b, groups, L, D] float32 (contiguous) accumulated."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows, pos_q, t_q, r, valid_q = _query_block(QPOS, Lq, L, dilation, pid_m, HAS_QPOS, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = valid_q[:, None] & d_mask[None, :]
    q = tl.load(Q + offset64(b, sqb) + offset64(h, sqh) + rows[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offset64(b, sdob) + offset64(h, sdoh) + rows[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + offset64(bh, Lq) + rows, mask=valid_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offset64(bh, Lq) + rows, mask=valid_q, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    kv_h = h // per_group  # this query head's key/value head: its dk, dv rows are the group's
    K += offset64(b, skb) + offset64(kv_h, skh)
    V += offset64(b, svb) + offset64(kv_h, svh)
    kv_bh = b * (H // per_group) + kv_h
    DK += offset64(kv_bh, L) * HEAD_DIM
    DV += offset64(kv_bh, L) * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_sub = (L - r + dilation - 1) // dilation
    if HAS_QPOS:  # [first, last + 1] position of the block's queries, from the host
        t_lo = tl.load(QBOUNDS + 2 * pid_m)
        t_hi = tl.load(QBOUNDS + 2 * pid_m + 1)
    else:
        t_lo = (pid_m // dilation) * BLOCK_M
        t_hi = t_lo + BLOCK_M
    s_lo = tl.maximum(t_lo - (window - 1), 0)
    s_hi = tl.minimum(t_hi, n_sub)
    seg_q = rows * 0
    if HAS_SEG:  # skip the key tiles before the block's earliest document
        seg_q = tl.load(SEG + offset64(b, L) + pos_q, mask=valid_q, other=-1)
        first = tl.min(tl.load(DSTART + offset64(b, L) + pos_q, mask=valid_q, other=L), axis=0)
        s_lo = tl.maximum(s_lo, (first - r + dilation - 1) // dilation)
    for s0 in range(s_lo, s_hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        pos_k = r + dilation * s
        valid_k = s < s_hi
        steps = t_q[:, None] - s[None, :]
        visible = (steps >= 0) & (steps < window) & valid_k[None, :] & valid_q[:, None]
        if HAS_SEG:
            seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
            visible = visible & (seg_q[:, None] == seg_k[None, :])
        kv_mask = valid_k[:, None] & d_mask[None, :]
        grad_off = pos_k[:, None] * HEAD_DIM + offs_d[None, :]
        dq = backward_tile(dq, q, do, lse2, delta, K + pos_k[:, None] * skn + offs_d[None, :],
                       V + pos_k[:, None] * svn + offs_d[None, :], DK + grad_off, DV + grad_off,
                       kv_mask, pos_q, pos_k, visible, slope, qk_scale, sm_scale, HAS_ALIBI,
                       DOT_PRECISION)
    if HAS_GLOBAL:
        for g0 in range(0, n_global, BLOCK_N):
            gi = g0 + tl.arange(0, BLOCK_N)
            valid_k = gi < n_global
            pos_k = tl.load(GKEYS + gi, mask=valid_k, other=0)
            gap = pos_q[:, None] - pos_k[None, :]
            in_window = (gap % dilation == 0) & (gap < window * dilation)
            visible = (gap >= 0) & ~in_window & valid_k[None, :] & valid_q[:, None]
            if HAS_SEG:
                seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
                visible = visible & (seg_q[:, None] == seg_k[None, :])
            kv_mask = valid_k[:, None] & d_mask[None, :]
            grad_off = pos_k[:, None] * HEAD_DIM + offs_d[None, :]
            dq = backward_tile(dq, q, do, lse2, delta, K + pos_k[:, None] * skn + offs_d[None, :],
                           V + pos_k[:, None] * svn + offs_d[None, :], DK + grad_off, DV + grad_off,
                           kv_mask, pos_q, pos_k, visible, slope, qk_scale, sm_scale, HAS_ALIBI,
                       DOT_PRECISION)
    tl.store(DQ + offset64(bh, Lq) * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=q_mask)


def _launch_shape(Lq: int, L: int, dilation: int, has_qpos: bool, block_m: int) -> int:
    if has_qpos:
        return triton.cdiv(Lq, block_m)
    return dilation * triton.cdiv(triton.cdiv(L, dilation), block_m)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, dilation, slopes, global_keys, q_positions, q_bounds, tiles,
                segments=None, doc_starts=None):
        B, H, Lq, D = q.shape
        L = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        fwd = tiles[0]
        block_d = max(16, triton.next_power_of_2(D))
        o = torch.empty_like(q)
        lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
        dummy = torch.zeros(1, device=q.device, dtype=torch.int32)
        grid = (_launch_shape(Lq, L, dilation, q_positions is not None, fwd.block_m), B * H)
        n_global = 0 if global_keys is None else len(global_keys)
        _window_fwd[grid](
            q, k, v, o, lse, slopes if slopes is not None else dummy,
            q_positions if q_positions is not None else dummy,
            q_bounds if q_bounds is not None else dummy, global_keys if global_keys is not None else dummy,
            segments if segments is not None else dummy, doc_starts if doc_starts is not None else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            H, H // k.shape[1], Lq, L, n_global, window, dilation, scale * LOG2E,
            HAS_ALIBI=slopes is not None, HAS_QPOS=q_positions is not None,
            HAS_GLOBAL=n_global > 0, HAS_SEG=segments is not None, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, DOT_PRECISION=dot_input_precision(q.dtype),
            num_warps=fwd.num_warps, num_stages=fwd.num_stages)
        ctx.save_for_backward(q, k, v, o, lse, slopes, global_keys, q_positions, q_bounds, segments, doc_starts)
        ctx.args = (scale, window, dilation, tiles[1])
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, slopes, global_keys, q_positions, q_bounds, segments, doc_starts = ctx.saved_tensors
        scale, window, dilation, bwd = ctx.args
        B, H, Lq, D = q.shape
        L = k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        if dlse is not None:  # d lse_i / d s_ij = p_ij: a gradient on lse shifts delta
            delta = delta - dlse.float()
        dq = torch.empty(B, H, Lq, D, device=q.device, dtype=torch.float32)
        dk = torch.zeros(B, k.shape[1], L, D, device=q.device, dtype=torch.float32)  # one per key/value head
        dv = torch.zeros_like(dk)
        dummy = torch.zeros(1, device=q.device, dtype=torch.int32)
        n_global = 0 if global_keys is None else len(global_keys)
        grid = (_launch_shape(Lq, L, dilation, q_positions is not None, bwd.block_m), B * H)
        _window_bwd[grid](
            q, k, v, do, dq, dk, dv, lse, delta, slopes if slopes is not None else dummy,
            q_positions if q_positions is not None else dummy,
            q_bounds if q_bounds is not None else dummy, global_keys if global_keys is not None else dummy,
            segments if segments is not None else dummy, doc_starts if doc_starts is not None else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            H, H // k.shape[1], Lq, L, n_global, window, dilation, scale * LOG2E, scale,
            HAS_ALIBI=slopes is not None, HAS_QPOS=q_positions is not None,
            HAS_GLOBAL=n_global > 0, HAS_SEG=segments is not None, HEAD_DIM=D,
            BLOCK_D=max(16, triton.next_power_of_2(D)),
            BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n, DOT_PRECISION=dot_input_precision(q.dtype),
            num_warps=bwd.num_warps, num_stages=bwd.num_stages)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None,
                None, None)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: Optional[int] = None, dilation: int = 1,
                     slopes: Optional[torch.Tensor] = None,
                     global_keys: Optional[torch.Tensor] = None,
                     q_positions: Optional[torch.Tensor] = None,
                     blocks: Optional[tuple[int, int, int]] = None,
                     segment_ids: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton windowed attention: q [b, h, Lq, D], k and v [b, g, L, D] (g key/value heads
    dividing h; query head i reads i // (h / g)) -> (out, lse [b, h, Lq]).

    Same arguments and result as `reference_window_attention` (see the module docstring);
    `blocks` = (block_m, block_n, num_warps) overrides the per-architecture tiles of
    `megalong.kernels.tuning.window_tiles`. Gradients flow to q, k, v
    (slopes and positions are constants)."""
    if dilation < 1 or (window is not None and window < 1):
        raise ValueError(f"window_attention: window {window} and dilation {dilation} must be >= 1")
    if q_positions is not None and (dilation != 1 or global_keys is not None):
        raise ValueError("window_attention: q_positions needs dilation 1 and no global_keys")
    if k.shape[1] != v.shape[1] or not 0 < k.shape[1] <= q.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"window_attention: {k.shape[1]} key / {v.shape[1]} value heads for "
                         f"{q.shape[1]} query heads (the key/value heads must divide them)")
    if q_positions is None and q.shape[2] != k.shape[2]:
        raise ValueError("window_attention: queries and keys differ in length; pass q_positions")
    L = k.shape[2]
    window = L if window is None else min(window, L)
    if slopes is not None:
        slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    if global_keys is not None:
        global_keys = global_keys.to(device=q.device, dtype=torch.int32).contiguous()
        global_keys = global_keys if len(global_keys) else None
    if q_positions is not None:
        q_positions = q_positions.to(device=q.device, dtype=torch.int32).contiguous()
    tiles = attention_launch_tiles(q.device, q.shape[-1], q.dtype, blocks)
    block_m = tiles[0].block_m
    assert tiles[1].block_m == block_m, "forward and backward cut the queries alike"
    q_bounds = None
    if q_positions is not None:  # per query block: first and one past the last position
        pad = (-len(q_positions)) % block_m
        tiles_q = torch.nn.functional.pad(q_positions, (0, pad), value=-1).view(-1, block_m)
        lo = torch.where(tiles_q >= 0, tiles_q, torch.iinfo(torch.int32).max).amin(1)
        q_bounds = torch.stack([lo, tiles_q.amax(1) + 1], 1).to(torch.int32).contiguous()
    segments = doc_starts = None
    if segment_ids is not None:  # int32 [b, L], and the first position of each token's document
        segments = segment_ids.to(device=q.device, dtype=torch.int32).contiguous()
        index = torch.arange(L, device=q.device, dtype=torch.int32).expand_as(segments)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        doc_starts = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values.contiguous()
    return _WindowAttention.apply(q, k, v, float(scale), int(window), int(dilation), slopes,
                                  global_keys, q_positions, q_bounds, tiles, segments, doc_starts)
