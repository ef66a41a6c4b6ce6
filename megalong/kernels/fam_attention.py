"""TransformerFAM's block-token attention (Triton), forward and backward, on the windowed kernel's tiles.

The sequence is cut into blocks of `block_size` B. A query at position p = t * B + i (block t)
sees, as `FamAttention.blocks` defines it (megalong/attention/fam.py, the torch path it must equal):

    memory and own block: keys at positions j with max(t - memory_segments, 0) * B <= j <= p,
                          ALiBi distance p - j;
    FAM:                  the fam_length keys F_{t-1} of block t (k_fam[:, :, t]), all visible,
                          standing at position t * B - 1 (distance i + 1).

Query tiles never straddle two blocks (a block holds ceil(B / block_m) tiles), so a tile visits
only the key tiles of [(t - memory_segments) * B, its last query] and its block's FAM tiles:
O(L * ((memory_segments + 1) * B + fam_length)) time, nothing of size L x L. The score, online
softmax and gradient steps are the windowed kernel's (`megalong.kernels.attention_tiles`); dq is written by
its query tile, dk, dv and the FAM keys' and values' gradients are accumulated with float32
atomics. Dropout is not implemented: callers use the torch path when dropout is active.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.attention_tiles import LOG2E, backward_tile, forward_tile
from megalong.kernels.offsets import offset64
from megalong.kernels.tuning import attention_launch_tiles, dot_input_precision


@triton.jit
def _fam_query_tile(pid, L, block_size, TILES: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's block t, first row of its tile in the block, query positions and validity."""
    t = pid // TILES
    i0 = (pid % TILES) * BLOCK_M
    i = i0 + tl.arange(0, BLOCK_M)
    pos = t * block_size + i
    return t, i0, pos, (i < block_size) & (pos < L)


@triton.jit
def _fam_documents(SEG, DSTART, FAMDOC, b, t, pos_q, valid_q, L, n_blocks, k_lo):
    """Packed documents: the queries' documents and positions in them, which queries continue
    F_{t-1}'s document (the others see the initial FAM), and the first key position a query of
    the tile can see (its earliest document's start)."""
    seg_q = tl.load(SEG + offset64(b, L) + pos_q, mask=valid_q, other=-1)
    start_q = tl.load(DSTART + offset64(b, L) + pos_q, mask=valid_q, other=L)
    fam_doc = tl.load(FAMDOC + offset64(b, n_blocks) + t)
    continued = valid_q & (seg_q == fam_doc)
    return seg_q, pos_q - start_q, continued, tl.maximum(k_lo, tl.min(start_q, axis=0))


@triton.jit
def _fam_keys_fwd(acc, m_i, l_i, q, KF, VF, skn, svn, fam_len, pos_q, key_pos, rows, d_mask, slope,
                  qk_scale, HAS_ALIBI: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """The fam_len FAM keys at KF, VF (row strides skn, svn), all standing at key_pos, visible to
    the query rows `rows`."""
    offs_d = tl.arange(0, BLOCK_D)
    for f0 in range(0, fam_len, BLOCK_N):
        fi = f0 + tl.arange(0, BLOCK_N)
        valid_k = fi < fam_len
        pos_k = tl.zeros([BLOCK_N], tl.int32) + key_pos
        visible = valid_k[None, :] & rows[:, None]
        kv_mask = valid_k[:, None] & d_mask[None, :]
        acc, m_i, l_i = forward_tile(acc, m_i, l_i, q, KF + fi[:, None] * skn + offs_d[None, :],
                                     VF + fi[:, None] * svn + offs_d[None, :], kv_mask,
                                     pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fam_keys_bwd(dq, q, do, lse2, delta, KF, VF, DKF, DVF, skn, svn, fam_len, pos_q, key_pos, rows,
                  d_mask, slope, qk_scale, sm_scale, HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`_fam_keys_fwd`'s backward: dq after the FAM keys, their gradients (rows of HEAD_DIM at DKF,
    DVF) added atomically."""
    offs_d = tl.arange(0, BLOCK_D)
    for f0 in range(0, fam_len, BLOCK_N):
        fi = f0 + tl.arange(0, BLOCK_N)
        valid_k = fi < fam_len
        pos_k = tl.zeros([BLOCK_N], tl.int32) + key_pos
        visible = valid_k[None, :] & rows[:, None]
        kv_mask = valid_k[:, None] & d_mask[None, :]
        grad_off = fi[:, None] * HEAD_DIM + offs_d[None, :]
        dq = backward_tile(dq, q, do, lse2, delta, KF + fi[:, None] * skn + offs_d[None, :],
                           VF + fi[:, None] * svn + offs_d[None, :], DKF + grad_off, DVF + grad_off,
                           kv_mask, pos_q, pos_k, visible, slope, qk_scale, sm_scale, HAS_ALIBI,
                           DOT_PRECISION)
    return dq


@triton.jit
def _fam_fwd(Q, K, V, KF, VF, O, LSE, SLOPES, SEG, DSTART, FAMDOC, KI, VI,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             sfkb, sfkh, sfkt, sfkn, sfvb, sfvh, sfvt, sfvn,
             H, L, n_blocks, block_size, memory, fam_len, qk_scale,
             HAS_ALIBI: tl.constexpr, HAS_FAM: tl.constexpr, HAS_SEG: tl.constexpr, GROUP: tl.constexpr,
             TILES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K, V, KF, VF (and KI, VI [b, g, fam_len, D] contiguous, the initial FAM's keys and values)
    hold g = H / GROUP key/value heads: query head h reads h // GROUP."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    t, i0, pos_q, valid_q = _fam_query_tile(pid, L, block_size, TILES, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + offset64(b, sqb) + offset64(h, sqh) + pos_q[:, None] * sqm + offs_d[None, :],
                mask=valid_q[:, None] & d_mask[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    K += offset64(b, skb) + offset64(kvh, skh)
    V += offset64(b, svb) + offset64(kvh, svh)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Memory blocks and the own block up to the tile's last query (from its earliest document).
    k_lo = tl.maximum(t - memory, 0) * block_size
    k_hi = tl.minimum(t * block_size + tl.minimum(i0 + BLOCK_M, block_size), L)
    seg_q = pos_q
    doc_pos = pos_q
    continued = valid_q
    if HAS_SEG:
        seg_q, doc_pos, continued, k_lo = _fam_documents(SEG, DSTART, FAMDOC, b, t, pos_q, valid_q, L,
                                                         n_blocks, k_lo)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        pos_k = k0 + tl.arange(0, BLOCK_N)
        valid_k = pos_k < k_hi
        visible = (pos_k[None, :] <= pos_q[:, None]) & valid_k[None, :] & valid_q[:, None]
        if HAS_SEG:
            seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
            visible = visible & (seg_q[:, None] == seg_k[None, :])
        kv_mask = valid_k[:, None] & d_mask[None, :]
        acc, m_i, l_i = forward_tile(acc, m_i, l_i, q, K + pos_k[:, None] * skn + offs_d[None, :],
                                     V + pos_k[:, None] * svn + offs_d[None, :], kv_mask,
                                     pos_q, pos_k, visible, slope, qk_scale, HAS_ALIBI, DOT_PRECISION)
    if HAS_FAM:  # F_{t-1}, at position t * B - 1, visible to the queries of its document
        KF += offset64(b, sfkb) + offset64(kvh, sfkh) + offset64(t, sfkt)
        VF += offset64(b, sfvb) + offset64(kvh, sfvh) + offset64(t, sfvt)
        if HAS_SEG:  # and the initial FAM, at its first position - 1, for documents started in block t
            if tl.max(continued.to(tl.int32), axis=0) > 0:
                acc, m_i, l_i = _fam_keys_fwd(acc, m_i, l_i, q, KF, VF, sfkn, sfvn, fam_len, pos_q,
                                              t * block_size - 1, continued, d_mask, slope, qk_scale,
                                              HAS_ALIBI, BLOCK_D, BLOCK_N, DOT_PRECISION)
            restarted = valid_q & ~continued
            if tl.max(restarted.to(tl.int32), axis=0) > 0:
                init = offset64(b * (H // GROUP) + kvh, fam_len * HEAD_DIM)
                acc, m_i, l_i = _fam_keys_fwd(acc, m_i, l_i, q, KI + init, VI + init, HEAD_DIM, HEAD_DIM,
                                              fam_len, doc_pos, -1, restarted, d_mask, slope, qk_scale,
                                              HAS_ALIBI, BLOCK_D, BLOCK_N, DOT_PRECISION)
        else:
            acc, m_i, l_i = _fam_keys_fwd(acc, m_i, l_i, q, KF, VF, sfkn, sfvn, fam_len, pos_q,
                                          t * block_size - 1, valid_q, d_mask, slope, qk_scale,
                                          HAS_ALIBI, BLOCK_D, BLOCK_N, DOT_PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + offset64(b, sob) + offset64(h, soh) + pos_q[:, None] * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=valid_q[:, None] & d_mask[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + offset64(bh, L) + pos_q, lse, mask=valid_q)


@triton.jit
def _fam_bwd(Q, K, V, KF, VF, DO, DQ, DK, DV, DKF, DVF, LSE, DELTA, SLOPES, SEG, DSTART, FAMDOC,
             KI, VI, DKI, DVI,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
             sfkb, sfkh, sfkt, sfkn, sfvb, sfvh, sfvt, sfvn,
             H, L, n_blocks, block_size, memory, fam_len, qk_scale, sm_scale,
             HAS_ALIBI: tl.constexpr, HAS_FAM: tl.constexpr, HAS_SEG: tl.constexpr, GROUP: tl.constexpr,
             TILES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq [b, h, L, D] float32 written here; dk, dv [b, g, L, D], dk_fam, dv_fam
    [b, g, n_blocks, fam_length, D] and dk_init, dv_init [b, g, fam_length, D] float32 (contiguous)
    accumulated (g = H / GROUP key/value heads)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    bg = b * (H // GROUP) + kvh
    t, i0, pos_q, valid_q = _fam_query_tile(pid, L, block_size, TILES, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = valid_q[:, None] & d_mask[None, :]
    q = tl.load(Q + offset64(b, sqb) + offset64(h, sqh) + pos_q[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offset64(b, sdob) + offset64(h, sdoh) + pos_q[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + offset64(bh, L) + pos_q, mask=valid_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offset64(bh, L) + pos_q, mask=valid_q, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    K += offset64(b, skb) + offset64(kvh, skh)
    V += offset64(b, svb) + offset64(kvh, svh)
    DK += offset64(bg, L) * HEAD_DIM
    DV += offset64(bg, L) * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_lo = tl.maximum(t - memory, 0) * block_size
    k_hi = tl.minimum(t * block_size + tl.minimum(i0 + BLOCK_M, block_size), L)
    seg_q = pos_q
    doc_pos = pos_q
    continued = valid_q
    if HAS_SEG:
        seg_q, doc_pos, continued, k_lo = _fam_documents(SEG, DSTART, FAMDOC, b, t, pos_q, valid_q, L,
                                                         n_blocks, k_lo)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        pos_k = k0 + tl.arange(0, BLOCK_N)
        valid_k = pos_k < k_hi
        visible = (pos_k[None, :] <= pos_q[:, None]) & valid_k[None, :] & valid_q[:, None]
        if HAS_SEG:
            seg_k = tl.load(SEG + offset64(b, L) + pos_k, mask=valid_k, other=-2)
            visible = visible & (seg_q[:, None] == seg_k[None, :])
        kv_mask = valid_k[:, None] & d_mask[None, :]
        grad_off = pos_k[:, None] * HEAD_DIM + offs_d[None, :]
        dq = backward_tile(dq, q, do, lse2, delta, K + pos_k[:, None] * skn + offs_d[None, :],
                           V + pos_k[:, None] * svn + offs_d[None, :], DK + grad_off, DV + grad_off,
                           kv_mask, pos_q, pos_k, visible, slope, qk_scale, sm_scale, HAS_ALIBI,
                           DOT_PRECISION)
    if HAS_FAM:
        KF += offset64(b, sfkb) + offset64(kvh, sfkh) + offset64(t, sfkt)
        VF += offset64(b, sfvb) + offset64(kvh, sfvh) + offset64(t, sfvt)
        DKF += (offset64(bg, n_blocks) + t) * fam_len * HEAD_DIM
        DVF += (offset64(bg, n_blocks) + t) * fam_len * HEAD_DIM
        if HAS_SEG:
            if tl.max(continued.to(tl.int32), axis=0) > 0:
                dq = _fam_keys_bwd(dq, q, do, lse2, delta, KF, VF, DKF, DVF, sfkn, sfvn, fam_len, pos_q,
                                   t * block_size - 1, continued, d_mask, slope, qk_scale, sm_scale,
                                   HAS_ALIBI, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
            restarted = valid_q & ~continued
            if tl.max(restarted.to(tl.int32), axis=0) > 0:
                init = offset64(bg, fam_len * HEAD_DIM)
                dq = _fam_keys_bwd(dq, q, do, lse2, delta, KI + init, VI + init, DKI + init, DVI + init,
                                   HEAD_DIM, HEAD_DIM, fam_len, doc_pos, -1, restarted, d_mask, slope,
                                   qk_scale, sm_scale, HAS_ALIBI, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
        else:
            dq = _fam_keys_bwd(dq, q, do, lse2, delta, KF, VF, DKF, DVF, sfkn, sfvn, fam_len, pos_q,
                               t * block_size - 1, valid_q, d_mask, slope, qk_scale, sm_scale,
                               HAS_ALIBI, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + offset64(bh, L) * HEAD_DIM + pos_q[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=q_mask)


def _fam_strides(x: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else (x.stride(0), x.stride(1), x.stride(2), x.stride(3))


class _FamBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_fam, v_fam, scale, block_size, memory, slopes, tiles, documents, k_init, v_init):
        Bt, H, L, D = q.shape
        G = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        has_fam = k_fam is not None
        if has_fam:
            k_fam, v_fam = k_fam.contiguous(), v_fam.contiguous()
        has_init = k_init is not None
        if has_init:
            k_init, v_init = k_init.contiguous(), v_init.contiguous()
        segments, doc_starts, fam_docs = documents if documents is not None else (None, None, None)
        fam_len = k_fam.shape[3] if has_fam else 0
        fwd = tiles[0]
        n_tiles = triton.cdiv(block_size, fwd.block_m)
        n_blocks = triton.cdiv(L, block_size)
        o = torch.empty_like(q)
        lse = torch.empty(Bt, H, L, device=q.device, dtype=torch.float32)
        dummy = torch.zeros(1, device=q.device, dtype=q.dtype)
        index = torch.zeros(1, device=q.device, dtype=torch.int32)
        _fam_fwd[(n_blocks * n_tiles, Bt * H)](
            q, k, v, k_fam if has_fam else dummy, v_fam if has_fam else dummy, o, lse,
            slopes if slopes is not None else dummy,
            *(x if x is not None else index for x in (segments, doc_starts, fam_docs)),
            k_init if has_init else dummy, v_init if has_init else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            *_fam_strides(k_fam), *_fam_strides(v_fam),
            H, L, n_blocks, block_size, memory, fam_len, scale * LOG2E,
            HAS_ALIBI=slopes is not None, HAS_FAM=fam_len > 0, HAS_SEG=segments is not None, GROUP=H // G,
            TILES=n_tiles, HEAD_DIM=D,
            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n,
            DOT_PRECISION=dot_input_precision(q.dtype), num_warps=fwd.num_warps, num_stages=fwd.num_stages)
        ctx.save_for_backward(q, k, v, k_fam, v_fam, o, lse, slopes, segments, doc_starts, fam_docs, k_init, v_init)
        ctx.args = (scale, block_size, memory, tiles[1])
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_fam, v_fam, o, lse, slopes, segments, doc_starts, fam_docs, k_init, v_init = ctx.saved_tensors
        scale, block_size, memory, bwd = ctx.args
        Bt, H, L, D = q.shape
        G = k.shape[1]
        has_fam = k_fam is not None
        has_init = k_init is not None
        fam_len = k_fam.shape[3] if has_fam else 0
        n_tiles = triton.cdiv(block_size, bwd.block_m)
        n_blocks = triton.cdiv(L, block_size)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty(Bt, H, L, D, **f32)
        dk = torch.zeros(Bt, G, L, D, **f32)
        dv = torch.zeros_like(dk)
        dkf = torch.zeros(k_fam.shape, **f32) if has_fam else None
        dvf = torch.zeros(v_fam.shape, **f32) if has_fam else None
        dki = torch.zeros(k_init.shape, **f32) if has_init else None
        dvi = torch.zeros(v_init.shape, **f32) if has_init else None
        dummy = torch.zeros(1, **f32)
        index = torch.zeros(1, device=q.device, dtype=torch.int32)
        _fam_bwd[(n_blocks * n_tiles, Bt * H)](
            q, k, v, k_fam if has_fam else dummy.to(q.dtype), v_fam if has_fam else dummy.to(q.dtype),
            do, dq, dk, dv, dkf if has_fam else dummy, dvf if has_fam else dummy, lse, delta,
            slopes if slopes is not None else dummy,
            *(x if x is not None else index for x in (segments, doc_starts, fam_docs)),
            k_init if has_init else dummy.to(q.dtype), v_init if has_init else dummy.to(q.dtype),
            dki if has_init else dummy, dvi if has_init else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            *_fam_strides(k_fam), *_fam_strides(v_fam),
            H, L, n_blocks, block_size, memory, fam_len, scale * LOG2E, scale,
            HAS_ALIBI=slopes is not None, HAS_FAM=fam_len > 0, HAS_SEG=segments is not None, GROUP=H // G,
            TILES=n_tiles, HEAD_DIM=D,
            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
            DOT_PRECISION=dot_input_precision(q.dtype), num_warps=bwd.num_warps, num_stages=bwd.num_stages)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dkf.to(k_fam.dtype) if has_fam else None, dvf.to(v_fam.dtype) if has_fam else None,
                None, None, None, None, None, None,
                dki.to(k_init.dtype) if has_init else None, dvi.to(v_init.dtype) if has_init else None)


def fam_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_fam: Optional[torch.Tensor], v_fam: Optional[torch.Tensor], scale: float,
                        block_size: int, memory_segments: int, slopes: Optional[torch.Tensor] = None,
                        blocks: Optional[tuple[int, int, int]] = None,
                        segment_ids: Optional[torch.Tensor] = None, fam_docs: Optional[torch.Tensor] = None,
                        k_init: Optional[torch.Tensor] = None, v_init: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """Triton `FamAttention.blocks`: q [b, h, L, D], k, v [b, g, L, D]; k_fam, v_fam
    [b, g, ceil(L / block_size), fam_length, D] (F_{t-1} for block t) or None -> [b, h, L, D]; g key/value
    groups dividing h (query head i reads group i // (h / g), no copies).

    `slopes` [h]: ALiBi slopes (None: no ALiBi); `blocks` = (block_m, block_n, num_warps) overrides
    the per-architecture tiles of `megalong.kernels.tuning.window_tiles`. Packed documents
    (`FamAttention.blocks` with `FamDocuments`): segment_ids [b, L], fam_docs [b, blocks] (the
    document of F_{t-1}) and, with FAM, k_init, v_init [b, g, fam_length, D] (the initial FAM's keys
    and values). Gradients flow to q, k, v, k_fam, v_fam, k_init and v_init."""
    if block_size < 1 or memory_segments < 0:
        raise ValueError(f"fam_block_attention: block_size {block_size} must be >= 1 and "
                         f"memory_segments {memory_segments} >= 0")
    b, h, L, D = q.shape
    g = k.shape[1]
    if g < 1 or h % g or tuple(v.shape[:2]) != (b, g) or tuple(k.shape) != (b, g, L, D):
        raise ValueError(f"fam_block_attention: k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         f"[{b}, groups, {L}, {D}] with groups dividing {h}")
    if (k_fam is None) != (v_fam is None):
        raise ValueError("fam_block_attention: pass both k_fam and v_fam, or neither")
    n_blocks = -(-L // block_size)
    if k_fam is not None and (k_fam.shape[:3] != (b, g, n_blocks) or k_fam.shape[4] != D
                              or v_fam.shape != k_fam.shape):
        raise ValueError(f"fam_block_attention: k_fam/v_fam {tuple(k_fam.shape)}/{tuple(v_fam.shape)} "
                         f"must be [{b}, {g}, {n_blocks}, fam_length, {D}]")
    if k_fam is not None and k_fam.shape[3] == 0:
        k_fam = v_fam = None
    if slopes is not None:
        slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    documents = None
    if segment_ids is not None:
        if fam_docs is None or tuple(segment_ids.shape) != (b, L) or tuple(fam_docs.shape) != (b, n_blocks):
            raise ValueError(f"fam_block_attention: segment_ids must be [{b}, {L}] and fam_docs [{b}, {n_blocks}]")
        if k_fam is None:
            k_init = v_init = None
        elif (k_init is None or v_init is None or tuple(k_init.shape) != (b, g, k_fam.shape[3], D)
              or v_init.shape != k_init.shape):
            raise ValueError(f"fam_block_attention: with FAM and segment_ids, k_init and v_init must be "
                             f"[{b}, {g}, {k_fam.shape[3]}, {D}]")
        documents = _document_tensors(segment_ids.to(q.device), fam_docs.to(q.device))
    else:
        k_init = v_init = None
    return _FamBlockAttention.apply(q, k, v, k_fam, v_fam, float(scale), int(block_size),
                                    int(memory_segments), slopes,
                                    attention_launch_tiles(q.device, D, q.dtype, blocks), documents, k_init, v_init)


def _document_tensors(segment_ids: torch.Tensor, fam_docs: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 [b, L] documents, [b, L] the first position of each token's document, [b, blocks] fam_docs."""
    segments = segment_ids.to(torch.int32).contiguous()
    index = torch.arange(segments.shape[1], device=segments.device, dtype=torch.int32).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    doc_starts = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values.contiguous()
    return segments, doc_starts, fam_docs.to(torch.int32).contiguous()
