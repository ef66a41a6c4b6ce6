"""MoE kernels (Triton), each beside the torch reference it must equal (megalong/moe/*'s path).

- `topk_gating`: softmax over the router logits, top-k (optionally chosen on probs + a selection
  bias, aux-loss-free balancing), renormalisation over the chosen, per-expert counts, in one pass
  over [tokens, experts]; the backward is elementwise torch.
- `permute_rows` / `combine_rows`: gather each expert's rows, and put the rows back as each
  token's gate-weighted sum of its (at most k) rows, without atomics.
- The experts' grouped GEMM is in `megalong/kernels/grouped_gemm.py`.

No kernel here has a `tl.dot`. Offsets that scale with the number of tokens are int64, so
[tokens, hidden] tensors past 2^31 elements index correctly.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.gating_reference import Gating


# ---- gating ------------------------------------------------------------------------------------

@triton.jit
def _gating_fwd(LOGITS, BIAS, PROBS, GATES, INDEX, COUNTS, T, E,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    row_offs = rows.to(tl.int64)
    x = tl.load(LOGITS + row_offs[:, None] * E + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(rmask[:, None], x, 0.0)  # padded rows: a harmless uniform row, never stored
    x = tl.where(cmask[None, :], x, float("-inf"))
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]
    tl.store(PROBS + row_offs[:, None] * E + cols[None, :], p, mask=mask)
    sel = p
    if HAS_BIAS:
        sel += tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
    sel = tl.where(cmask[None, :], sel, float("-inf"))
    top = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    index = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(sel, 1)  # first of equal values: the lowest expert index
        hit = cols[None, :] == best[:, None]
        top = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, p, 0.0), 1)[:, None], top)
        index = tl.where(kcols[None, :] == j, best[:, None], index)
        sel = tl.where(hit, float("-inf"), sel)
        tl.atomic_add(COUNTS + best, 1, mask=rmask)
    kmask = kcols < K
    if RENORM:
        top = top / tl.sum(tl.where(kmask[None, :], top, 0.0), 1)[:, None]
    out_mask = rmask[:, None] & kmask[None, :]
    tl.store(GATES + row_offs[:, None] * K + kcols[None, :], top, mask=out_mask)
    tl.store(INDEX + row_offs[:, None] * K + kcols[None, :], index.to(tl.int64), mask=out_mask)


class _Gating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize, selection_bias):
        T, E = logits.shape
        logits = logits.contiguous()
        probs = torch.empty(T, E, device=logits.device, dtype=torch.float32)
        gates = torch.empty(T, k, device=logits.device, dtype=torch.float32)
        index = torch.empty(T, k, device=logits.device, dtype=torch.int64)
        counts = torch.zeros(E, device=logits.device, dtype=torch.int32)
        block_t = 64
        bias = selection_bias if selection_bias is not None else probs
        _gating_fwd[(triton.cdiv(T, block_t),)](
            logits, bias, probs, gates, index, counts, T, E, K=k, HAS_BIAS=selection_bias is not None,
            RENORM=renormalize, BLOCK_T=block_t, BLOCK_E=max(16, triton.next_power_of_2(E)),
            BLOCK_K=max(2, triton.next_power_of_2(k)), num_warps=4)
        ctx.save_for_backward(probs, gates, index)
        ctx.renormalize, ctx.dtype = renormalize, logits.dtype
        ctx.mark_non_differentiable(index, counts)
        return probs, gates, index, counts.long()

    @staticmethod
    def backward(ctx, dprobs, dgates, _dindex, _dcounts):
        probs, gates, index = ctx.saved_tensors
        dp = torch.zeros_like(probs) if dprobs is None else dprobs.float().clone()
        if dgates is not None:
            dgates = dgates.float()
            if ctx.renormalize:  # g_j = p_j / s: dp_j = (dg_j - sum_l dg_l g_l) / s
                s = probs.gather(1, index).sum(-1, keepdim=True)
                dgates = (dgates - (dgates * gates).sum(-1, keepdim=True)) / s
            dp = dp.scatter_add(1, index, dgates)
        dlogits = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        return dlogits.to(ctx.dtype), None, None, None


def topk_gating(logits: torch.Tensor, k: int, renormalize: bool,
                selection_bias: Optional[torch.Tensor] = None) -> Gating:
    """Fused gating on router logits [T, E] (computed in float32); see `gating_reference.reference_topk_gating`."""
    E = logits.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_gating: top-k {k} must lie in 1..{E} experts")
    if selection_bias is not None:
        selection_bias = selection_bias.to(device=logits.device, dtype=torch.float32).contiguous()
    probs, gates, index, counts = _Gating.apply(logits, k, renormalize, selection_bias)
    return Gating(probs, gates, index, counts)


# ---- permutation -------------------------------------------------------------------------------

def rows_of_tokens(token: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """[T, k] row of each token's j-th assignment in the sorted rows (-1 where none), from
    `Dispatch.token` (rows sorted by expert, tokens ascending inside an expert)."""
    rows = torch.full((num_tokens, k), -1, dtype=torch.int32, device=token.device)
    # The j-th row of a token in sorted order: rank among the rows of that token.
    order = torch.argsort(token, stable=True)
    first = torch.searchsorted(token[order], torch.arange(num_tokens, device=token.device))
    slot = torch.arange(len(token), device=token.device) - first[token[order]]
    rows[token[order], slot] = order.to(torch.int32)
    return rows


@triton.jit
def _gather_rows(X, SRC, SCALE, Y, N, H, HAS_SCALE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Y[n] = X[SRC[n]] (* SCALE[n])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    row_offs = rows.to(tl.int64)
    src = tl.load(SRC + rows, mask=rmask, other=0).to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(SCALE + rows, mask=rmask, other=0.0)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (cols[None, :] < H)
        x = tl.load(X + src[:, None] * H + cols[None, :], mask=mask, other=0.0)
        if HAS_SCALE:
            x = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
        tl.store(Y + row_offs[:, None] * H + cols[None, :], x, mask=mask)


@triton.jit
def _combine_rows(Y, ROWS, W, OUT, T, H, K: tl.constexpr, HAS_W: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_j W[row_j] * Y[row_j] over the token's rows ROWS[t, j] >= 0 (float32 sum)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    tok_offs = toks.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        for j in tl.static_range(K):
            row = tl.load(ROWS + tok_offs * K + j, mask=tmask, other=-1)
            has = row >= 0
            row = tl.where(has, row, 0).to(tl.int64)
            y = tl.load(Y + row[:, None] * H + cols[None, :], mask=has[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            if HAS_W:
                y *= tl.load(W + row, mask=has, other=0.0)[:, None]
            acc += y
        tl.store(OUT + tok_offs[:, None] * H + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])


def _gather(x: torch.Tensor, src: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    x = x.contiguous()
    N, H = len(src), x.shape[1]
    y = torch.empty(N, H, device=x.device, dtype=x.dtype)
    if N:
        _gather_rows[(triton.cdiv(N, 32),)](x, src.contiguous(), scale if scale is not None else x, y,
                                           N, H, HAS_SCALE=scale is not None, BLOCK_R=32,
                                           BLOCK_H=min(256, triton.next_power_of_2(max(H, 16))),
                                           num_warps=4)
    return y


def _combine(y: torch.Tensor, rows: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    y = y.contiguous()
    T, K = rows.shape
    H = y.shape[1]
    out = torch.empty(T, H, device=y.device, dtype=y.dtype)
    if T:
        _combine_rows[(triton.cdiv(T, 32),)](y, rows.contiguous(), weight if weight is not None else y,
                                            out, T, H, K=K, HAS_W=weight is not None, BLOCK_T=32,
                                            BLOCK_H=min(256, triton.next_power_of_2(max(H, 16))),
                                            num_warps=4)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, rows):
        ctx.save_for_backward(rows)
        return _gather(x, token)

    @staticmethod
    def backward(ctx, dy):
        (rows,) = ctx.saved_tensors
        return _combine(dy, rows, None), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate, token, rows):
        gate32 = gate.float().contiguous()
        ctx.save_for_backward(y, gate32, token, rows)
        ctx.gate_dtype = gate.dtype
        return _combine(y, rows, gate32)

    @staticmethod
    def backward(ctx, dout):
        y, gate32, token, rows = ctx.saved_tensors
        dy = _gather(dout, token, gate32)
        dgate = None
        if ctx.needs_input_grad[1]:
            dgate = (_gather(dout, token).float() * y.float()).sum(-1).to(ctx.gate_dtype)
        return dy, dgate, None, None


def permute_rows(x: torch.Tensor, token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[T, h] -> [N, h], row n = x[token[n]] (`megalong.moe.dispatch.permute`); `rows` from
    `rows_of_tokens` serves the backward."""
    return _Permute.apply(x, token, rows)


def combine_rows(y: torch.Tensor, gate: torch.Tensor, token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[N, h] -> [T, h], token t = sum of gate[n] * y[n] over its rows (`dispatch.unpermute`)."""
    return _Combine.apply(y, gate, token, rows)
