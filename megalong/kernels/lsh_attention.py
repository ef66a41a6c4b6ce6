"""LSH chunk attention (Triton), forward and backward, beside the torch reference it must equal.

The inner part of Reformer attention (`megalong.attention.lsh.LshAttention.attend`): for every
(batch, head, round) the tokens are already sorted by (bucket, position) and cut into chunks of
`chunk` rows; each chunk's queries attend to the keys of their own chunk and of the chunk before
(the first chunk only to its own), under the causal mask on the original positions. A query's own
key scores SELF_SCORE (finite and constant: no gradient), and with several rounds a pair seen in
N rounds is scored -log N in each (the union's softmax after the log-sum-exp combination), N read
from every round's chunk of both tokens. ALiBi uses the original positions. Returns the sorted
outputs and the log-sum-exp of every sorted row, which the caller uses to combine the rounds.
Shapes: sq, sk, sv [b, h, n_rounds, Lp, d] (Lp a multiple of `chunk`), positions [b, h, n, Lp]
(the original position of each sorted row), chunk_of [b, h, n, Lp] (chunk of each original
position in each round). A program takes BLOCK_M query rows of a chunk and walks the
two chunks' keys BLOCK_N at a time (tiles per architecture and dtype: `megalong.kernels.tuning.lsh_tiles`).
The backward accumulates dk and dv with float32 atomics (every key row serves the query blocks of
two chunks).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.arch import device_arch
from megalong.kernels.offsets import offset64
from megalong.kernels.tuning import dot_input_precision, lsh_tiles

SELF_SCORE = -1e5  # as megalong.attention.lsh.SELF_SCORE


def reference_lsh_chunk_attention(sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor,
                                  positions: torch.Tensor, chunk_of: torch.Tensor, chunk: int,
                                  scale: float, slopes: Optional[torch.Tensor] = None,
                                  segment_ids: Optional[torch.Tensor] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit per-pair scores over all Lp keys of the round (O(Lp^2)): (out, lse); segment_ids
    [b, Lp] (the document of every original position): pairs of one document only."""
    b, h, n, Lp, d = sq.shape
    scores = torch.matmul(sq, sk.transpose(-1, -2)) * scale  # [b, h, n, Lp, Lp]
    distance = positions.unsqueeze(-1) - positions.unsqueeze(-2)
    rows = torch.arange(Lp, device=sq.device)
    q_chunk, k_chunk = rows.view(-1, 1) // chunk, rows.view(1, -1) // chunk
    in_window = (q_chunk == k_chunk) | (q_chunk == k_chunk + 1)
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).view(1, h, 1, 1, 1) * distance.to(scores.dtype)
    if n > 1:
        times = torch.zeros_like(scores)
        for r in range(n):
            cq = chunk_of[:, :, r].gather(-1, positions.flatten(2)).view(b, h, n, Lp, 1)
            ck = chunk_of[:, :, r].gather(-1, positions.flatten(2)).view(b, h, n, 1, Lp)
            times += ((cq - ck == 0) | (cq - ck == 1)).to(scores.dtype)
        scores = scores - torch.log(times.clamp(min=1))
    scores = scores.masked_fill(distance == 0, SELF_SCORE)
    visible = (distance >= 0) & in_window
    if segment_ids is not None:
        doc = segment_ids.view(b, 1, 1, Lp).expand(b, h, n, Lp).gather(-1, positions)
        visible = visible & (doc.unsqueeze(-1) == doc.unsqueeze(-2))
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), sv), lse


@triton.jit
def _lsh_scores(q, k, pos_q, pos_k, rows_k, valid_k, visible, CHUNK_OF, g_rounds, Lp, slope, qk_scale,
                N_ROUNDS: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores in the log2 domain; -inf where not causal or not `visible` (different documents);
    also returns where the score is constant."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    distance = pos_q[:, None] - pos_k[None, :]
    if HAS_ALIBI:
        s -= slope * 1.4426950408889634 * distance.to(tl.float32)
    if N_ROUNDS > 1:
        times = tl.zeros(s.shape, tl.float32)
        for r in tl.static_range(N_ROUNDS):
            cq = tl.load(CHUNK_OF + g_rounds + r * Lp + pos_q)
            ck = tl.load(CHUNK_OF + g_rounds + r * Lp + pos_k, mask=valid_k, other=-10)
            gap = cq[:, None] - ck[None, :]
            times += ((gap == 0) | (gap == 1)).to(tl.float32)
        s -= tl.log2(tl.maximum(times, 1.0))
    is_self = distance == 0
    s = tl.where(is_self, -1e5 * 1.4426950408889634, s)
    return tl.where((distance >= 0) & valid_k[None, :] & visible, s, float("-inf")), is_self


@triton.jit
def _same_document(SEG, seg_q, pos_k, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: query and key in one document (everywhere without segments)."""
    seg_k = seg_q
    if HAS_SEG:
        seg_k = tl.load(SEG + pos_k)
    else:
        seg_k = tl.zeros_like(pos_k)
        seg_q = tl.zeros_like(seg_q)
    return seg_q[:, None] == seg_k[None, :]


@triton.jit
def _lsh_fwd(Q, K, V, POS, CHUNK_OF, O, LSE, SLOPES, SEG, Lp, qk_scale, H,
             N_ROUNDS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """BLOCK_M query rows of one chunk (program_id(0)) against its own chunk's and the chunk
    before's keys, BLOCK_N keys per step (both divide CHUNK)."""
    qb = tl.program_id(0)
    g = tl.program_id(1)  # (batch, head, round)
    bh = g // N_ROUNDS
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = offset64(g, Lp)
    g_rounds = offset64(bh, N_ROUNDS * Lp)
    rows = qb * BLOCK_M + offs_m
    c = (qb * BLOCK_M) // CHUNK
    q = tl.load(Q + (base + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    pos_q = tl.load(POS + base + rows)
    SEG += offset64(bh // H, Lp)  # [b, Lp]: the document of every original position
    seg_q = pos_q
    if HAS_SEG:
        seg_q = tl.load(SEG + pos_q)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    valid_k = offs_n >= 0
    kv_mask = valid_k[:, None] & d_mask[None, :]
    for k0 in range(tl.maximum(c - 1, 0) * CHUNK, (c + 1) * CHUNK, BLOCK_N):  # chunk before, own chunk
        rows_k = k0 + offs_n
        k = tl.load(K + (base + rows_k)[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + (base + rows_k)[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        pos_k = tl.load(POS + base + rows_k)
        visible = _same_document(SEG, seg_q, pos_k, HAS_SEG)
        s, _ = _lsh_scores(q, k, pos_q, pos_k, rows_k, valid_k, visible, CHUNK_OF, g_rounds, Lp, slope,
                           qk_scale, N_ROUNDS, HAS_ALIBI, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]  # every row sees at least itself
    tl.store(O + (base + rows)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=d_mask[None, :])
    tl.store(LSE + base + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453)


@triton.jit
def _lsh_bwd(Q, K, V, POS, CHUNK_OF, DO, LSE, DELTA, DQ, DK, DV, SLOPES, SEG, Lp, qk_scale, sm_scale, H,
             N_ROUNDS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SEG: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """dq of BLOCK_M query rows written here; their dk, dv contributions added atomically."""
    qb = tl.program_id(0)
    g = tl.program_id(1)
    bh = g // N_ROUNDS
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = offset64(g, Lp)
    g_rounds = offset64(bh, N_ROUNDS * Lp)
    rows = qb * BLOCK_M + offs_m
    c = (qb * BLOCK_M) // CHUNK
    row_ptr = (base + rows)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + row_ptr, mask=d_mask[None, :], other=0.0)
    do = tl.load(DO + row_ptr, mask=d_mask[None, :], other=0.0)
    lse2 = tl.load(LSE + base + rows) * 1.4426950408889634
    delta = tl.load(DELTA + base + rows)
    pos_q = tl.load(POS + base + rows)
    SEG += offset64(bh // H, Lp)  # [b, Lp]: the document of every original position
    seg_q = pos_q
    if HAS_SEG:
        seg_q = tl.load(SEG + pos_q)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    valid_k = offs_n >= 0
    kv_mask = valid_k[:, None] & d_mask[None, :]
    for k0 in range(tl.maximum(c - 1, 0) * CHUNK, (c + 1) * CHUNK, BLOCK_N):
        rows_k = k0 + offs_n
        k_ptr = (base + rows_k)[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + k_ptr, mask=kv_mask, other=0.0)
        v = tl.load(V + k_ptr, mask=kv_mask, other=0.0)
        pos_k = tl.load(POS + base + rows_k)
        visible = _same_document(SEG, seg_q, pos_k, HAS_SEG)
        s, is_self = _lsh_scores(q, k, pos_q, pos_k, rows_k, valid_k, visible, CHUNK_OF, g_rounds, Lp, slope,
                                 qk_scale, N_ROUNDS, HAS_ALIBI, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        tl.atomic_add(DV + k_ptr, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION),
                      mask=kv_mask)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(tl.float32)
        ds = tl.where(is_self, 0.0, p * (dp - delta[:, None]))  # the self score is a constant
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
        tl.atomic_add(DK + k_ptr, tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * sm_scale,
                      mask=kv_mask)
    tl.store(DQ + row_ptr, dq, mask=d_mask[None, :])


class _LshChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sq, sk, sv, positions, chunk_of, chunk, scale, slopes, segments):
        b, h, n, Lp, d = sq.shape
        sq, sk, sv = sq.contiguous(), sk.contiguous(), sv.contiguous()
        positions = positions.to(torch.int32).contiguous()
        chunk_of = chunk_of.to(torch.int32).contiguous()
        out = torch.empty_like(sq)
        lse = torch.empty(b, h, n, Lp, device=sq.device, dtype=torch.float32)
        block_d = max(16, triton.next_power_of_2(d))
        tiles = lsh_tiles(device_arch(sq.device), d, sq.dtype, backward=False)
        block_m, block_n = min(tiles.block_m, chunk), min(tiles.block_n, chunk)
        _lsh_fwd[(Lp // block_m, b * h * n)](
            sq, sk, sv, positions, chunk_of, out, lse, slopes if slopes is not None else lse,
            segments if segments is not None else positions,
            Lp, scale * 1.4426950408889634, h, N_ROUNDS=n, HAS_ALIBI=slopes is not None,
            HAS_SEG=segments is not None,
            HEAD_DIM=d, BLOCK_D=block_d, CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=dot_input_precision(sq.dtype), num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)
        ctx.save_for_backward(sq, sk, sv, positions, chunk_of, out, lse, slopes, segments)
        ctx.args = (chunk, scale)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        sq, sk, sv, positions, chunk_of, out, lse, slopes, segments = ctx.saved_tensors
        chunk, scale = ctx.args
        b, h, n, Lp, d = sq.shape
        do = do.contiguous()
        delta = (do.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        dq = torch.empty(sq.shape, device=sq.device, dtype=torch.float32)
        dk = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        tiles = lsh_tiles(device_arch(sq.device), d, sq.dtype, backward=True)
        block_m, block_n = min(tiles.block_m, chunk), min(tiles.block_n, chunk)
        _lsh_bwd[(Lp // block_m, b * h * n)](
            sq, sk, sv, positions, chunk_of, do, lse, delta, dq, dk, dv,
            slopes if slopes is not None else lse, segments if segments is not None else positions,
            Lp, scale * 1.4426950408889634, scale, h,
            N_ROUNDS=n, HAS_ALIBI=slopes is not None, HAS_SEG=segments is not None, HEAD_DIM=d,
            BLOCK_D=max(16, triton.next_power_of_2(d)), CHUNK=chunk, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION=dot_input_precision(sq.dtype), num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)
        return dq.to(sq.dtype), dk.to(sk.dtype), dv.to(sv.dtype), None, None, None, None, None, None


def lsh_chunk_attention(sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor, positions: torch.Tensor,
                        chunk_of: torch.Tensor, chunk: int, scale: float,
                        slopes: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton LSH chunk attention; see the module docstring and `reference_lsh_chunk_attention`.
    `chunk` must be a power of two >= 16 dividing Lp; segment_ids [b, Lp]: the document of every
    original position (packed documents; padding any id of its own), pairs of one document only."""
    Lp = sq.shape[3]
    if chunk < 16 or chunk & (chunk - 1) or Lp % chunk:
        raise ValueError(f"lsh_chunk_attention: chunk {chunk} must be a power of two >= 16 dividing {Lp}")
    if slopes is not None:
        slopes = slopes.to(device=sq.device, dtype=torch.float32).contiguous()
    segments = None
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (sq.shape[0], Lp):
            raise ValueError(f"lsh_chunk_attention: segment_ids {tuple(segment_ids.shape)} must be "
                             f"[{sq.shape[0]}, {Lp}]")
        segments = segment_ids.to(device=sq.device, dtype=torch.int32).contiguous()
    return _LshChunk.apply(sq, sk, sv, positions, chunk_of, int(chunk), float(scale), slopes, segments)
