"""MoE kernels (Triton), each beside the torch reference it must equal (megalong/moe/*'s path).

- `topk_gating`: softmax over the router logits, top-k (optionally chosen on probs + a selection
  bias, aux-loss-free balancing), renormalisation over the chosen, per-expert counts, in one pass
  over [tokens, experts]; the backward is elementwise torch.
- `permute_rows` / `combine_rows`: gather each expert's rows, and put the rows back as each
  token's gate-weighted sum of its (at most k) rows, without atomics.
- `grouped_mm`: rows grouped by expert (counts per expert) times per-expert weights [E, n, m]:
  `torch._grouped_mm` on CUDA in bf16 where torch has it, else a Triton grouped GEMM (forward,
  input gradient as the same kernel on transposed weights, weight gradient per expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megalong.kernels import _interpret  # noqa: F401  (CPU interpreter fix, no-op on the GPU)


# ---- gating ------------------------------------------------------------------------------------

@dataclass
class Gating:
    probs: torch.Tensor  # [T, E] router probabilities (float32)
    gates: torch.Tensor  # [T, k] combine weights (renormalised over the chosen when asked)
    expert_index: torch.Tensor  # [T, k] chosen experts, best first (int64)
    counts: torch.Tensor  # [E] assignments per expert (int64)


def reference_topk_gating(logits: torch.Tensor, k: int, renormalize: bool,
                          selection_bias: Optional[torch.Tensor] = None) -> Gating:
    """What `TopKRouter.forward` does after its linear layer."""
    probs = torch.softmax(logits, dim=-1)
    if selection_bias is not None:
        index = (probs + selection_bias.to(probs.dtype)).topk(k, dim=-1).indices
        top = probs.gather(1, index)
    else:
        top, index = probs.topk(k, dim=-1)
    gates = top / top.sum(-1, keepdim=True) if renormalize else top
    return Gating(probs, gates, index, torch.bincount(index.reshape(-1), minlength=logits.shape[1]))


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
    x = tl.load(LOGITS + rows[:, None] * E + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(rmask[:, None], x, 0.0)  # padded rows: a harmless uniform row, never stored
    x = tl.where(cmask[None, :], x, float("-inf"))
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]
    tl.store(PROBS + rows[:, None] * E + cols[None, :], p, mask=mask)
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
    tl.store(GATES + rows[:, None] * K + kcols[None, :], top, mask=out_mask)
    tl.store(INDEX + rows[:, None] * K + kcols[None, :], index.to(tl.int64), mask=out_mask)


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
    """Fused gating on router logits [T, E] (computed in float32); see `reference_topk_gating`."""
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
    src = tl.load(SRC + rows, mask=rmask, other=0).to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(SCALE + rows, mask=rmask, other=0.0)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (cols[None, :] < H)
        x = tl.load(X + src[:, None] * H + cols[None, :], mask=mask, other=0.0)
        if HAS_SCALE:
            x = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
        tl.store(Y + rows[:, None].to(tl.int64) * H + cols[None, :], x, mask=mask)


@triton.jit
def _combine_rows(Y, ROWS, W, OUT, T, H, K: tl.constexpr, HAS_W: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_j W[row_j] * Y[row_j] over the token's rows ROWS[t, j] >= 0 (float32 sum)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        for j in tl.static_range(K):
            row = tl.load(ROWS + toks * K + j, mask=tmask, other=-1)
            has = row >= 0
            row = tl.where(has, row, 0).to(tl.int64)
            y = tl.load(Y + row[:, None] * H + cols[None, :], mask=has[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            if HAS_W:
                y *= tl.load(W + row, mask=has, other=0.0)[:, None]
            acc += y
        tl.store(OUT + toks[:, None].to(tl.int64) * H + cols[None, :], acc.to(OUT.dtype.element_ty),
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


# ---- grouped GEMM ------------------------------------------------------------------------------

@triton.jit
def _grouped_mm_kernel(X, W, Y, OFFS, TILE_EXPERT, TILE_START, N, Kd, M, swe, swk, swm,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[rows of e] = X[rows of e] @ W[e]; one program per (row tile of one expert, column tile).
    X [N, Kd], Y [N, M] contiguous; W indexed by strides (a transposed view works)."""
    tile = tl.program_id(0)
    e = tl.load(TILE_EXPERT + tile)
    start = tl.load(TILE_START + tile)
    end = tl.load(OFFS + e + 1)  # tiles past the last expert have start == end: nothing to do
    rows = start + tl.arange(0, BLOCK_R)
    rmask = rows < end
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    acc = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    W += e.to(tl.int64) * swe
    for k0 in range(0, Kd, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < Kd
        x = tl.load(X + rows[:, None].to(tl.int64) * Kd + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + ks[:, None] * swk + cols[None, :] * swm, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(x, w)
    tl.store(Y + rows[:, None].to(tl.int64) * M + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(X, DY, DW, OFFS, Kd, M,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """DW[e] = X[rows of e]^T @ DY[rows of e] (zero for an expert without rows); float32 out."""
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    kmask = ks < Kd
    cmask = cols < M
    start = tl.load(OFFS + e)
    end = tl.load(OFFS + e + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        x = tl.load(X + rows[:, None].to(tl.int64) * Kd + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        dy = tl.load(DY + rows[:, None].to(tl.int64) * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(x), dy)
    tl.store(DW + e.to(tl.int64) * Kd * M + ks[:, None] * M + cols[None, :], acc,
             mask=kmask[:, None] & cmask[None, :])


_TILES = dict(BLOCK_R=64, BLOCK_M=64, BLOCK_K=32)


def _tile_table(offs: torch.Tensor, N: int, E: int, block_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row tiles of every expert, without a host sync: a fixed-size table of cdiv(N, block_r) + E
    tiles, the unused ones given an empty row range."""
    counts = offs[1:] - offs[:-1]
    tiles = (counts + block_r - 1) // block_r
    ends = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(N, block_r) + E
    t = torch.arange(n_tiles, device=offs.device)
    expert = torch.searchsorted(ends, t, right=True).clamp(max=E - 1)
    within = t - (ends - tiles)[expert]
    start = torch.where(t < ends[-1], offs[expert] + within * block_r, offs[expert + 1])
    return expert.to(torch.int32).contiguous(), start.to(torch.int32).contiguous()


def _triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    N, Kd = x.shape
    E, _, M = w.shape
    y = torch.empty(N, M, device=x.device, dtype=x.dtype)
    expert, start = _tile_table(offs, N, E, _TILES["BLOCK_R"])
    grid = (len(expert), triton.cdiv(M, _TILES["BLOCK_M"]))
    _grouped_mm_kernel[grid](x.contiguous(), w, y, offs, expert, start, N, Kd, M,
                             w.stride(0), w.stride(1), w.stride(2), num_warps=4, **_TILES)
    return y


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _triton_grouped_mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _triton_grouped_mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            E, Kd, M = w.shape
            dw = torch.empty(E, Kd, M, device=w.device, dtype=torch.float32)
            grid = (E, triton.cdiv(Kd, 32), triton.cdiv(M, 64))
            _grouped_wgrad_kernel[grid](x.contiguous(), dy, dw, offs, Kd, M, BLOCK_R=32, BLOCK_K=32,
                                        BLOCK_M=64, num_warps=4)
            dw = dw.to(w.dtype)
        return dx, dw, None


def _torch_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """x [N, n] rows sorted by expert, w [E, n, m], tokens_per_expert [E] -> [N, m].
    backend: auto (torch._grouped_mm where usable, else Triton), torch, triton."""
    offs = torch.zeros(len(tokens_per_expert) + 1, dtype=torch.int32, device=x.device)
    offs[1:] = torch.cumsum(tokens_per_expert.to(x.device), 0)
    if backend == "torch" or (backend == "auto" and _torch_grouped_mm_ok(x, w)):
        return torch._grouped_mm(x, w, offs=offs[1:].contiguous())
    return _GroupedMM.apply(x, w, offs)


def reference_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """A loop over experts."""
    parts = x.split(tokens_per_expert.tolist())
    return torch.cat([part @ w[e] for e, part in enumerate(parts)], dim=0)


def grouped_experts(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, w3: Optional[torch.Tensor], activation: Callable,
                    backend: str = "auto") -> torch.Tensor:
    """`Experts.forward` with grouped GEMMs: act(x W1[e]) (* x W3[e]) @ W2[e] per expert's rows."""
    h = activation(grouped_mm(x, w1, tokens_per_expert, backend))
    if w3 is not None:
        h = h * grouped_mm(x, w3, tokens_per_expert, backend)
    return grouped_mm(h, w2, tokens_per_expert, backend)
