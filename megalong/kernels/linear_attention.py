"""Chunked causal linear attention (Triton), forward and backward, beside its torch reference.

Katharopoulos et al.'s causal form on feature maps fq = phi(q), fk = phi(k) (phi = elu + 1):

    out_i = sum_{j<=i} (fq_i . fk_j) v_j / (sum_{j<=i} fq_i . fk_j + eps)

Programs walk the chunks of one (batch, head) in order, quadratic only inside a chunk, carrying a
running state in registers. The [D, E] states are split over programs so that each fits: the
forward runs one program per block of value columns (state S[:, e-block] = sum fk v^T, z = sum fk);
the backward runs three kernels: dq per block of feature columns walking forward (S[d-block, :]),
dk per block of feature columns walking backward (R[d-block, :] with R = sum fq dnum^T,
r = sum fq dden), and dv per block of value columns walking backward (R[:, e-block]). A program
recomputes the chunk's [chunk, chunk] scores it needs. `tl.dot` operands keep the inputs' dtype
(bf16 states and scores are rounded to bf16 for the dot, accumulation is float32) and float32
operands follow `megalong.kernels.tuning.dot_input_precision`.
The feature map stays in torch (elementwise; autograd chains it), so the kernel's inputs are
features. The reference is `megalong.kernels.linear_reference.causal_linear_attention`.

Packed documents (segment ids [b, L], non-decreasing along a row): pairs inside a chunk are
masked to one document; the state carried into a chunk serves only the rows of the document the
previous chunk ended in, and the state carried out is that of the document the chunk ends in
(the torch form is `megalong.attention.linear_documents.segmented_linear_attention`); the backward
walks mirror it (the sums carried back serve the keys of the next chunk's first document).
Grouped-query attention: fk and v hold g key/value heads, query head h reads h // (H / g); the dk
and dv programs of a group's query heads add into its rows with float32 atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.arch import device_arch
from megalong.kernels.linear_reference import causal_linear_attention, elu_feature_map
from megalong.kernels.offsets import offset64
from megalong.kernels.tuning import dot_input_precision, linear_tiles


def reference_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                               chunk_size: int = 64) -> torch.Tensor:
    """megalong's torch path: elu + 1 features, then the chunked causal form."""
    return causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, eps, chunk_size)


@triton.jit
def _kv_head(bh, H, GROUP: tl.constexpr):
    """(batch, the key/value head query head bh reads): query head h reads group h // GROUP."""
    b = bh // H
    kvh = bh  # one head per group: the index math of the plain kernel (sm_80's dq is at 255 registers)
    if GROUP > 1:
        kvh = b * (H // GROUP) + (bh % H) // GROUP
    return b, kvh


@triton.jit
def _linear_fwd(FQ, FK, V, O, DEN, SEG, L, H, eps, D: tl.constexpr, E: tl.constexpr,
                PAD_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """FQ [BH, L, D], FK [B * H / GROUP, L, D], V [B * H / GROUP, L, E], O [BH, L, E], DEN [BH, L]
    (float32), SEG [B, L] int32 (HAS_SEG), all contiguous; this program writes the value columns
    of block program_id(0) (and DEN when that is block 0)."""
    pe = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _kv_head(bh, H, GROUP)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, PAD_D)
    offs_e = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    FQ += offset64(bh, L) * D
    FK += offset64(kvh, L) * D
    V += offset64(kvh, L) * E
    O += offset64(bh, L) * E
    DEN += offset64(bh, L)
    SEG += offset64(b, L)
    S = tl.zeros([PAD_D, BLOCK_E], tl.float32)
    z = tl.zeros([PAD_D], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(0, L, CHUNK):
        rows = c0 + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fq = tl.load(FQ + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0)
        visible = causal
        if HAS_SEG:  # the state carried in serves the rows of the previous chunk's last document
            seg, prev, last = _chunk_documents(SEG, rows, rmask, c0, L, CHUNK)
            visible = causal & (seg[:, None] == seg[None, :])
            carried = seg == prev
        A = tl.where(visible, tl.dot(fq, tl.trans(fk), input_precision=DOT_PRECISION), 0.0)
        num = tl.dot(A.to(v.dtype), v, input_precision=DOT_PRECISION)
        den = tl.sum(A, 1)
        if HAS_SEG:
            num += tl.where(carried[:, None], tl.dot(fq, S.to(fq.dtype), input_precision=DOT_PRECISION), 0.0)
            den += tl.where(carried, tl.sum(fq.to(tl.float32) * z[None, :], 1), 0.0)
        else:
            num += tl.dot(fq, S.to(fq.dtype), input_precision=DOT_PRECISION)
            den += tl.sum(fq.to(tl.float32) * z[None, :], 1)
        out = num / (den + eps)[:, None]
        tl.store(O + rows[:, None] * E + offs_e[None, :], out.to(O.dtype.element_ty), mask=emask)
        tl.store(DEN + rows, den, mask=rmask & (pe == 0))
        if HAS_SEG:  # the state carried out: that of the chunk's last document
            fk = tl.where((seg == last)[:, None], fk, 0.0).to(fk.dtype)
            S = tl.where(last == prev, S, 0.0)
            z = tl.where(last == prev, z, 0.0)
        S += tl.dot(tl.trans(fk), v, input_precision=DOT_PRECISION)
        z += tl.sum(fk.to(tl.float32), 0)


@triton.jit
def _chunk_documents(SEG, rows, rmask, c0, L, CHUNK: tl.constexpr):
    """Walking forward: the chunk's documents (-1 past L), the document of the token before the
    chunk (-1 for the first chunk) and that of the chunk's last token."""
    seg = tl.load(SEG + rows, mask=rmask, other=-1)
    prev = tl.load(SEG + tl.maximum(c0 - 1, 0), mask=c0 > 0, other=-1)
    last = tl.load(SEG + tl.minimum(c0 + CHUNK, L) - 1)
    return seg, prev, last


@triton.jit
def _chunk_documents_reversed(SEG, rows, rmask, c0, L, CHUNK: tl.constexpr):
    """Walking backward: the chunk's documents (-1 past L), the document of the token after the
    chunk (-1 for the last chunk) and that of the chunk's first token."""
    seg = tl.load(SEG + rows, mask=rmask, other=-1)
    nxt = tl.load(SEG + tl.minimum(c0 + CHUNK, L - 1), mask=c0 + CHUNK < L, other=-1)
    first = tl.load(SEG + c0)
    return seg, nxt, first


@triton.jit
def _linear_bwd_dq(FK, V, DNUM, DDEN, DFQ, SEG, L, H, D: tl.constexpr, E: tl.constexpr,
                   BLOCK_D: tl.constexpr, PAD_E: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                   HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dfq[:, d-block] = M fk[:, d-block] + dnum S[d-block]^T + dden z[d-block], walking forward
    with S, z of the chunks before (of the row's document); M = d out / d (fq . fk) inside the
    chunk. DNUM [BH, L, E], DDEN [BH, L] float32; DFQ float32."""
    pd = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _kv_head(bh, H, GROUP)
    offs_c = tl.arange(0, CHUNK)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, PAD_E)
    FK += offset64(kvh, L) * D
    DFQ += offset64(bh, L) * D
    V += offset64(kvh, L) * E
    DNUM += offset64(bh, L) * E
    DDEN += offset64(bh, L)
    SEG += offset64(b, L)
    causal = offs_c[:, None] >= offs_c[None, :]
    S = tl.zeros([BLOCK_D, PAD_E], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, L, CHUNK):
        rows = c0 + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0)
        dnum = tl.load(DNUM + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(v.dtype)
        dden = tl.load(DDEN + rows, mask=rmask, other=0.0)
        visible = causal
        if HAS_SEG:
            seg, prev, last = _chunk_documents(SEG, rows, rmask, c0, L, CHUNK)
            visible = causal & (seg[:, None] == seg[None, :])
            carried = seg == prev
        M = tl.dot(dnum, tl.trans(v), input_precision=DOT_PRECISION) + dden[:, None]
        M = tl.where(visible, M, 0.0)
        dfq = tl.dot(M.to(fk.dtype), fk, input_precision=DOT_PRECISION)
        if HAS_SEG:
            state = tl.dot(dnum, tl.trans(S.to(dnum.dtype)), input_precision=DOT_PRECISION)
            dfq += tl.where(carried[:, None], state + dden[:, None] * z[None, :], 0.0)
        else:
            dfq += tl.dot(dnum, tl.trans(S.to(dnum.dtype)), input_precision=DOT_PRECISION)
            dfq += dden[:, None] * z[None, :]
        tl.store(DFQ + rows[:, None] * D + offs_d[None, :], dfq, mask=dmask)
        if HAS_SEG:
            fk = tl.where((seg == last)[:, None], fk, 0.0).to(fk.dtype)
            S = tl.where(last == prev, S, 0.0)
            z = tl.where(last == prev, z, 0.0)
        S += tl.dot(tl.trans(fk), v, input_precision=DOT_PRECISION)
        z += tl.sum(fk.to(tl.float32), 0)


@triton.jit
def _linear_bwd_dk(FQ, V, DNUM, DDEN, DFK, SEG, L, H, D: tl.constexpr, E: tl.constexpr,
                   BLOCK_D: tl.constexpr, PAD_E: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                   HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dfk[:, d-block] = M^T fq[:, d-block] + v R[d-block]^T + r[d-block], walking backward with
    R = sum fq dnum^T and r = sum fq dden of the chunks after (of the key's document). DFK
    [B * H / GROUP, L, D] float32: with GROUP > 1 the query heads of a group add theirs atomically
    (zeroed by the caller)."""
    pd = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _kv_head(bh, H, GROUP)
    offs_c = tl.arange(0, CHUNK)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, PAD_E)
    FQ += offset64(bh, L) * D
    DFK += offset64(kvh, L) * D
    V += offset64(kvh, L) * E
    DNUM += offset64(bh, L) * E
    DDEN += offset64(bh, L)
    SEG += offset64(b, L)
    causal = offs_c[:, None] >= offs_c[None, :]
    n_chunks = (L + CHUNK - 1) // CHUNK
    R = tl.zeros([BLOCK_D, PAD_E], tl.float32)
    r = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, n_chunks):
        c0 = (n_chunks - 1 - j) * CHUNK
        rows = c0 + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fq = tl.load(FQ + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0)
        dnum = tl.load(DNUM + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(v.dtype)
        dden = tl.load(DDEN + rows, mask=rmask, other=0.0)
        visible = causal
        if HAS_SEG:  # the sums carried back serve the keys of the next chunk's first document
            seg, nxt, first = _chunk_documents_reversed(SEG, rows, rmask, c0, L, CHUNK)
            visible = causal & (seg[:, None] == seg[None, :])
            carried = seg == nxt
        M = tl.dot(dnum, tl.trans(v), input_precision=DOT_PRECISION) + dden[:, None]
        M = tl.where(visible, M, 0.0)
        dfk = tl.dot(tl.trans(M.to(fq.dtype)), fq, input_precision=DOT_PRECISION)
        if HAS_SEG:
            state = tl.dot(v, tl.trans(R.to(v.dtype)), input_precision=DOT_PRECISION) + r[None, :]
            dfk += tl.where(carried[:, None], state, 0.0)
        else:
            dfk += tl.dot(v, tl.trans(R.to(v.dtype)), input_precision=DOT_PRECISION) + r[None, :]
        if GROUP > 1:
            tl.atomic_add(DFK + rows[:, None] * D + offs_d[None, :], dfk, mask=dmask)
        else:
            tl.store(DFK + rows[:, None] * D + offs_d[None, :], dfk, mask=dmask)
        if HAS_SEG:
            in_first = seg == first
            fq = tl.where(in_first[:, None], fq, 0.0).to(fq.dtype)
            dden = tl.where(in_first, dden, 0.0)
            R = tl.where(first == nxt, R, 0.0)
            r = tl.where(first == nxt, r, 0.0)
        R += tl.dot(tl.trans(fq), dnum, input_precision=DOT_PRECISION)
        r += tl.sum(fq.to(tl.float32) * dden[:, None], 0)


@triton.jit
def _linear_bwd_dv(FQ, FK, DNUM, DV, SEG, L, H, D: tl.constexpr, E: tl.constexpr,
                   PAD_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                   HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dv[:, e-block] = A^T dnum[:, e-block] + fk R[:, e-block], walking backward with
    R = sum fq dnum^T of the chunks after (of the key's document); A = fq fk^T inside the chunk
    (causal). DV [B * H / GROUP, L, E] float32, added atomically with GROUP > 1."""
    pe = tl.program_id(0)
    bh = tl.program_id(1)
    b, kvh = _kv_head(bh, H, GROUP)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, PAD_D)
    offs_e = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    FQ += offset64(bh, L) * D
    FK += offset64(kvh, L) * D
    DV += offset64(kvh, L) * E
    DNUM += offset64(bh, L) * E
    SEG += offset64(b, L)
    causal = offs_c[:, None] >= offs_c[None, :]
    n_chunks = (L + CHUNK - 1) // CHUNK
    R = tl.zeros([PAD_D, BLOCK_E], tl.float32)
    for j in range(0, n_chunks):
        c0 = (n_chunks - 1 - j) * CHUNK
        rows = c0 + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fq = tl.load(FQ + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0)
        dnum = tl.load(DNUM + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(fq.dtype)
        visible = causal
        if HAS_SEG:
            seg, nxt, first = _chunk_documents_reversed(SEG, rows, rmask, c0, L, CHUNK)
            visible = causal & (seg[:, None] == seg[None, :])
            carried = seg == nxt
        A = tl.where(visible, tl.dot(fq, tl.trans(fk), input_precision=DOT_PRECISION), 0.0)
        dv = tl.dot(tl.trans(A.to(dnum.dtype)), dnum, input_precision=DOT_PRECISION)
        if HAS_SEG:
            dv += tl.where(carried[:, None], tl.dot(fk, R.to(fk.dtype), input_precision=DOT_PRECISION), 0.0)
        else:
            dv += tl.dot(fk, R.to(fk.dtype), input_precision=DOT_PRECISION)
        if GROUP > 1:
            tl.atomic_add(DV + rows[:, None] * E + offs_e[None, :], dv, mask=emask)
        else:
            tl.store(DV + rows[:, None] * E + offs_e[None, :], dv, mask=emask)
        if HAS_SEG:
            fq = tl.where((seg == first)[:, None], fq, 0.0).to(fq.dtype)
            R = tl.where(first == nxt, R, 0.0)
        R += tl.dot(tl.trans(fq), dnum, input_precision=DOT_PRECISION)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, eps, chunk, segments):
        B, H, L, D = fq.shape
        G, E = fk.shape[1], v.shape[-1]
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        out = torch.empty(B, H, L, E, device=v.device, dtype=v.dtype)
        den = torch.empty(B, H, L, device=v.device, dtype=torch.float32)
        tiles = linear_tiles(device_arch(v.device), D, E, v.dtype)
        block_e = min(tiles.block_e, _pad(E))
        _linear_fwd[(triton.cdiv(E, block_e), B * H)](
            fq, fk, v, out, den, den if segments is None else segments, L, H, eps, D=D, E=E, PAD_D=_pad(D),
            BLOCK_E=block_e, CHUNK=chunk, GROUP=H // G, HAS_SEG=segments is not None,
            DOT_PRECISION=dot_input_precision(v.dtype), num_warps=tiles.num_warps, num_stages=1)
        ctx.save_for_backward(fq, fk, v, out, den, segments)
        ctx.args = (eps, chunk)
        return out

    @staticmethod
    def backward(ctx, g):
        fq, fk, v, out, den, segments = ctx.saved_tensors
        eps, chunk = ctx.args
        B, H, L, D = fq.shape
        G, E = fk.shape[1], v.shape[-1]
        inv = 1.0 / (den + eps)
        g = g.float()
        dnum = (g * inv.unsqueeze(-1)).contiguous()
        dden = (-(g * out.float()).sum(-1) * inv).contiguous()
        dfq = torch.empty(B, H, L, D, device=v.device, dtype=torch.float32)
        new = torch.zeros if G < H else torch.empty  # a group's query heads add into its rows
        dfk = new(B, G, L, D, device=v.device, dtype=torch.float32)
        dv = new(B, G, L, E, device=v.device, dtype=torch.float32)
        tiles = linear_tiles(device_arch(v.device), D, E, v.dtype)
        block_d, block_e = min(tiles.block_d, _pad(D)), min(tiles.block_e, _pad(E))
        seg = den if segments is None else segments
        common = dict(D=D, E=E, CHUNK=chunk, GROUP=H // G, HAS_SEG=segments is not None,
                      DOT_PRECISION=dot_input_precision(v.dtype), num_warps=tiles.num_warps, num_stages=1)
        d_grid = (triton.cdiv(D, block_d), B * H)
        _linear_bwd_dq[d_grid](fk, v, dnum, dden, dfq, seg, L, H, BLOCK_D=block_d, PAD_E=_pad(E), **common)
        _linear_bwd_dk[d_grid](fq, v, dnum, dden, dfk, seg, L, H, BLOCK_D=block_d, PAD_E=_pad(E), **common)
        _linear_bwd_dv[(triton.cdiv(E, block_e), B * H)](fq, fk, dnum, dv, seg, L, H, PAD_D=_pad(D),
                                                         BLOCK_E=block_e, **common)
        return dfq.to(fq.dtype), dfk.to(fk.dtype), dv.to(v.dtype), None, None, None


def causal_linear_attention_features(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor,
                                     eps: float = 1e-6, chunk_size: int = 64,
                                     segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton equivalent of `linear_reference.causal_linear_attention` on features
    fq [b, h, L, D], fk [b, g, L, D] and v [b, g, L, E] (g key/value groups dividing h: query head
    i reads group i // (h / g), no copies); with segment_ids [b, L] (packed documents, non-decreasing
    along a row) of `linear_documents.segmented_linear_attention`: the sums restart at every
    document. `chunk_size` is rounded up to a power of two >= 16."""
    b, h, L, _ = fq.shape
    g = fk.shape[1]
    if g < 1 or h % g or v.shape[1] != g:
        raise ValueError(f"linear_attention: {h} query heads, {fk.shape[1]} key and {v.shape[1]} value "
                         "heads: key/value heads must be equal and divide the query heads")
    segments = None
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, L):
            raise ValueError(f"linear_attention: segment_ids {tuple(segment_ids.shape)} must be [{b}, {L}]")
        segments = segment_ids.to(device=fq.device, dtype=torch.int32).contiguous()
    chunk = max(16, triton.next_power_of_2(chunk_size))
    return _CausalLinear.apply(fq, fk, v, float(eps), chunk, segments)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     chunk_size: int = 64, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """elu + 1 causal linear attention, q [b, h, L, D], k [b, g, L, D], v [b, g, L, E] -> [b, h, L, E]
    (g key/value groups; segment_ids [b, L]: packed documents)."""
    return causal_linear_attention_features(elu_feature_map(q), elu_feature_map(k), v, eps, chunk_size,
                                            segment_ids)
