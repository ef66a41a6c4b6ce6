"""Chunked causal linear attention (Triton), forward and backward, beside its torch reference.

Katharopoulos et al.'s causal form on feature maps fq = phi(q), fk = phi(k) (phi = elu + 1):

    out_i = sum_{j<=i} (fq_i . fk_j) v_j / (sum_{j<=i} fq_i . fk_j + eps)

One program per (batch, head) walks the chunks in order, quadratic only inside a chunk, carrying
the state S = sum fk v^T [D, E] and z = sum fk [D] in registers; the backward walks forward once
for dq (with S, z) and backward once for dk and dv (with R = sum fq dnum^T, r = sum fq dden).
The feature map stays in torch (elementwise; autograd chains it), so the kernel's inputs are
features. The reference is `megalong.attention.linear.causal_linear_attention`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megalong.attention.linear import causal_linear_attention, elu_feature_map


def reference_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                               chunk_size: int = 64) -> torch.Tensor:
    """megalong's torch path: elu + 1 features, then the chunked causal form."""
    return causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, eps, chunk_size)


@triton.jit
def _linear_fwd(FQ, FK, V, O, DEN, L, eps, D: tl.constexpr, E: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """FQ, FK [BH, L, D], V and O [BH, L, E], DEN [BH, L] (float32), all contiguous."""
    bh = tl.program_id(0)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    FQ += bh * L * D
    FK += bh * L * D
    V += bh * L * E
    O += bh * L * E
    DEN += bh * L
    S = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(0, L, CHUNK):
        rows = c0 + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fq = tl.load(FQ + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(tl.float32)
        A = tl.where(causal, tl.dot(fq, tl.trans(fk)), 0.0)
        num = tl.dot(A, v) + tl.dot(fq, S)
        den = tl.sum(A, 1) + tl.sum(fq * z[None, :], 1)
        out = num / (den + eps)[:, None]
        tl.store(O + rows[:, None] * E + offs_e[None, :], out.to(O.dtype.element_ty), mask=emask)
        tl.store(DEN + rows, den, mask=rmask)
        S += tl.dot(tl.trans(fk), v)
        z += tl.sum(fk, 0)


@triton.jit
def _linear_bwd(FQ, FK, V, DNUM, DDEN, DFQ, DFK, DV, L, D: tl.constexpr, E: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """Gradients of (num, den) given DNUM [BH, L, E] and DDEN [BH, L] (float32); outputs float32."""
    bh = tl.program_id(0)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    FQ += bh * L * D
    FK += bh * L * D
    DFQ += bh * L * D
    DFK += bh * L * D
    V += bh * L * E
    DV += bh * L * E
    DNUM += bh * L * E
    DDEN += bh * L
    causal = offs_c[:, None] >= offs_c[None, :]
    n_chunks = (L + CHUNK - 1) // CHUNK

    # dq: forward over chunks with the state of the chunks before.
    S = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, n_chunks):
        rows = i * CHUNK + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(tl.float32)
        dnum = tl.load(DNUM + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0)
        dden = tl.load(DDEN + rows, mask=rmask, other=0.0)
        M = tl.where(causal, tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)  # d out_i / d (fq_i.fk_j)
        dfq = tl.dot(M, fk) + tl.dot(dnum, tl.trans(S)) + dden[:, None] * z[None, :]
        tl.store(DFQ + rows[:, None] * D + offs_d[None, :], dfq, mask=dmask)
        S += tl.dot(tl.trans(fk), v)
        z += tl.sum(fk, 0)

    # dk, dv: backward over chunks with the sums over the chunks after.
    R = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    r = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, n_chunks):
        rows = (n_chunks - 1 - j) * CHUNK + offs_c
        rmask = rows < L
        dmask = rmask[:, None] & (offs_d[None, :] < D)
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fq = tl.load(FQ + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
        fk = tl.load(FK + rows[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0).to(tl.float32)
        dnum = tl.load(DNUM + rows[:, None] * E + offs_e[None, :], mask=emask, other=0.0)
        dden = tl.load(DDEN + rows, mask=rmask, other=0.0)
        M = tl.where(causal, tl.dot(dnum, tl.trans(v)) + dden[:, None], 0.0)
        A = tl.where(causal, tl.dot(fq, tl.trans(fk)), 0.0)
        dfk = tl.dot(tl.trans(M), fq) + tl.dot(v, tl.trans(R)) + r[None, :]
        dv = tl.dot(tl.trans(A), dnum) + tl.dot(fk, R)
        tl.store(DFK + rows[:, None] * D + offs_d[None, :], dfk, mask=dmask)
        tl.store(DV + rows[:, None] * E + offs_e[None, :], dv, mask=emask)
        R += tl.dot(tl.trans(fq), dnum)
        r += tl.sum(fq * dden[:, None], 0)


def _blocks(D: int, E: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(E))


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, eps, chunk):
        B, H, L, D = fq.shape
        E = v.shape[-1]
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        out = torch.empty_like(v)
        den = torch.empty(B, H, L, device=v.device, dtype=torch.float32)
        block_d, block_e = _blocks(D, E)
        _linear_fwd[(B * H,)](fq, fk, v, out, den, L, eps, D=D, E=E, BLOCK_D=block_d,
                              BLOCK_E=block_e, CHUNK=chunk, num_warps=4)
        ctx.save_for_backward(fq, fk, v, out, den)
        ctx.args = (eps, chunk)
        return out

    @staticmethod
    def backward(ctx, g):
        fq, fk, v, out, den = ctx.saved_tensors
        eps, chunk = ctx.args
        B, H, L, D = fq.shape
        E = v.shape[-1]
        inv = 1.0 / (den + eps)
        g = g.float()
        dnum = (g * inv.unsqueeze(-1)).contiguous()
        dden = (-(g * out.float()).sum(-1) * inv).contiguous()
        dfq = torch.empty(B, H, L, D, device=v.device, dtype=torch.float32)
        dfk = torch.empty_like(dfq)
        dv = torch.empty(B, H, L, E, device=v.device, dtype=torch.float32)
        block_d, block_e = _blocks(D, E)
        _linear_bwd[(B * H,)](fq, fk, v, dnum, dden, dfq, dfk, dv, L, D=D, E=E, BLOCK_D=block_d,
                              BLOCK_E=block_e, CHUNK=chunk, num_warps=4)
        return dfq.to(fq.dtype), dfk.to(fk.dtype), dv.to(v.dtype), None, None


def causal_linear_attention_features(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor,
                                     eps: float = 1e-6, chunk_size: int = 64) -> torch.Tensor:
    """Triton equivalent of `megalong.attention.linear.causal_linear_attention` on features
    fq, fk [b, h, L, D] and v [b, h, L, E]; `chunk_size` is rounded up to a power of two >= 16."""
    chunk = max(16, triton.next_power_of_2(chunk_size))
    return _CausalLinear.apply(fq, fk, v, float(eps), chunk)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     chunk_size: int = 64) -> torch.Tensor:
    """elu + 1 causal linear attention, q, k [b, h, L, D], v [b, h, L, E] -> [b, h, L, E]."""
    return causal_linear_attention_features(elu_feature_map(q), elu_feature_map(k), v, eps, chunk_size)
