"""The MoE experts' grouped GEMM (Triton), beside the loop over experts it must equal.

`grouped_mm(x, w, tokens_per_expert)`: rows of x grouped by expert (counts per expert) times
per-expert weights w [E, n, m]. How it runs, each decided by a small function the tests and the
compile gate call directly:

- dtype (`gemm_dtype`): under autocast for x's device with a 16-bit dtype, x and w are cast to it,
  as torch casts the operands of its own matmuls (the experts' torch path, `Experts.expert`, is such
  a matmul); the output has that dtype, and the gradients reach x and the float32 master weights in
  their own dtypes. Without autocast x and w must share a dtype.
- backend (`grouped_mm_backend`): `torch._grouped_mm` on CUDA sm_90+ for bf16 operands whose inner
  sizes are multiples of 8, else the Triton kernels here (forward; input gradient as the same kernel
  on transposed weights; weight gradient per expert, accumulated and returned in float32 before the
  cast to the weights' dtype).
- tiles (`forward_tiles`, `wgrad_tiles`): a pure function of (arch, dtype, sizes). Every `tl.dot`
  has 128 rows with 8 warps, so on sm_90 each warpgroup issues wgmma on 64-row tiles (HGMMA); on
  sm_80 they become mma.sync (HMMA). Chosen by compiling each launch for sm_90 and sm_80 at the
  hidden sizes 768/2048/2560 (ffn 4x), 8 and 64 experts, bf16 and float32: no spills, at most
  98,304 bytes of shared memory (within sm_80's 166,912 and sm_86/89's 101,376). Arch 0 (the CPU
  interpreter) takes 16-wide tiles, so the tests' small shapes cross tile boundaries.
- `tl.dot` precision (`dot_input_precision`): float32 operands run as "tf32x3" (three TF32 products
  that recover float32 accuracy, still on the tensor cores) while torch's own float32 matmul
  precision is "highest" (its default: no TF32), and as "tf32" when a user lowered it
  (`torch.set_float32_matmul_precision("high")`). Triton's default would be plain TF32 (~1e-3
  relative), which the CPU interpreter (exact float32) cannot show. 16-bit operands multiply
  exactly into the float32 accumulator; the setting does not apply to them ("ieee").
- offsets: every tile's row and column offsets are int64, so [rows, hidden] tensors past 2^31
  elements (many tokens) index correctly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megalong.kernels.arch import device_arch

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


# ---- choices: dtype, backend, precision, tiles -------------------------------------------------

def gemm_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the grouped GEMM multiplies in (see the module docstring)."""
    device = x.device.type
    if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and x.dtype != torch.float64 and w.dtype != torch.float64):
        dtype = torch.get_autocast_dtype(device)
        if dtype in _AUTOCAST_DTYPES:
            return dtype
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: rows are {x.dtype} but the weights {w.dtype} (outside autocast "
                         "both must have one dtype)")
    return x.dtype


def grouped_mm_backend(dtype: torch.dtype, n: int, m: int, arch: int,
                       has_torch_grouped_mm: bool = hasattr(torch, "_grouped_mm")) -> str:
    """"torch_grouped_mm" or "triton" for operands of `dtype` (after `gemm_dtype`), x [N, n],
    w [E, n, m], on a device of compute capability `arch` (90 for sm_90; 0 off CUDA)."""
    if (has_torch_grouped_mm and arch >= 90 and dtype == torch.bfloat16
            and n % 8 == 0 and m % 8 == 0):
        return "torch_grouped_mm"
    return "triton"


def dot_input_precision(dtype: torch.dtype, float32_precision: Optional[str] = None) -> str:
    """`tl.dot`'s input_precision for operands of `dtype`; float32_precision defaults to
    `torch.get_float32_matmul_precision()`."""
    if dtype != torch.float32:
        return "ieee"
    precision = float32_precision or torch.get_float32_matmul_precision()
    return "tf32x3" if precision == "highest" else "tf32"


@dataclass(frozen=True)
class GemmTiles:
    block_r: int  # rows (tokens) per step
    block_k: int  # the n dimension (the weights' input features)
    block_m: int  # the m dimension (the weights' output features)
    num_warps: int
    num_stages: int


def _fit(block: int, size: int) -> int:
    """A tile no wider than the dimension needs (>= 16, tl.dot's minimum)."""
    return min(block, max(16, triton.next_power_of_2(size)))


def forward_tiles(arch: int, dtype: torch.dtype, n: int, m: int) -> GemmTiles:
    """Tiles of the forward kernel (also the input gradient's, on w transposed): each program
    computes block_r rows x block_m columns of one expert, stepping block_k over n."""
    if arch == 0:
        return GemmTiles(16, 16, 16, 1, 1)
    stages = 3 if arch >= 80 else 2
    if dtype.itemsize == 2:
        return GemmTiles(128, _fit(64, n), _fit(128, m), 8, stages)
    # float32 runs tf32x3, whose split operands need more registers: mma.sync (sm_80) keeps them
    # in registers and spills at 128 columns; wgmma (sm_90) reads them from shared memory.
    return GemmTiles(128, _fit(32, n), _fit(128 if arch >= 90 else 64, m), 8, stages)


def wgrad_tiles(arch: int, dtype: torch.dtype, n: int, m: int) -> GemmTiles:
    """Tiles of the weight-gradient kernel: each program computes a block_k x block_m tile of one
    expert's dW, stepping block_r over its rows (the dot's reduction)."""
    if arch == 0:
        return GemmTiles(16, 16, 16, 1, 1)
    stages = 3 if arch >= 80 else 2
    if dtype.itemsize == 2:
        return GemmTiles(64, _fit(128, n), _fit(128, m), 8, stages)
    return GemmTiles(32, _fit(128, n), _fit(128 if arch >= 90 else 64, m), 8, stages)


# ---- kernels -----------------------------------------------------------------------------------

@triton.jit
def _grouped_mm_kernel(X, W, Y, OFFS, TILE_EXPERT, TILE_START, N, Kd, M, swe, swk, swm,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
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
    row_offs = rows.to(tl.int64)
    col_offs = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    W += e.to(tl.int64) * swe
    for k0 in range(0, Kd, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < Kd
        k_offs = ks.to(tl.int64)
        x = tl.load(X + row_offs[:, None] * Kd + k_offs[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + k_offs[:, None] * swk + col_offs[None, :] * swm, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    tl.store(Y + row_offs[:, None] * M + col_offs[None, :], acc.to(Y.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(X, DY, DW, OFFS, Kd, M, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """DW[e] = X[rows of e]^T @ DY[rows of e] (zero for an expert without rows); float32 out."""
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    kmask = ks < Kd
    cmask = cols < M
    k_offs = ks.to(tl.int64)
    col_offs = cols.to(tl.int64)
    start = tl.load(OFFS + e)
    end = tl.load(OFFS + e + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        row_offs = rows.to(tl.int64)
        x = tl.load(X + row_offs[:, None] * Kd + k_offs[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        dy = tl.load(DY + row_offs[:, None] * M + col_offs[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += tl.dot(tl.trans(x), dy, input_precision=DOT_PRECISION)
    tl.store(DW + e.to(tl.int64) * Kd * M + k_offs[:, None] * M + col_offs[None, :], acc,
             mask=kmask[:, None] & cmask[None, :])


# ---- launchers ---------------------------------------------------------------------------------

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


def _forward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, n] @ w[e] [n, m] per expert's rows (x, w of one dtype)."""
    N, Kd = x.shape
    E, _, M = w.shape
    y = torch.empty(N, M, device=x.device, dtype=x.dtype)
    tiles = forward_tiles(device_arch(x.device), x.dtype, Kd, M)
    expert, start = _tile_table(offs, N, E, tiles.block_r)
    grid = (len(expert), triton.cdiv(M, tiles.block_m))
    _grouped_mm_kernel[grid](x.contiguous(), w, y, offs, expert, start, N, Kd, M,
                             w.stride(0), w.stride(1), w.stride(2), BLOCK_R=tiles.block_r,
                             BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_k,
                             DOT_PRECISION=dot_input_precision(x.dtype),
                             num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return y


def _wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, E: int) -> torch.Tensor:
    """dW [E, n, m] (float32) = x[rows of e]^T @ dy[rows of e]."""
    Kd, M = x.shape[1], dy.shape[1]
    dw = torch.empty(E, Kd, M, device=x.device, dtype=torch.float32)
    tiles = wgrad_tiles(device_arch(x.device), x.dtype, Kd, M)
    grid = (E, triton.cdiv(Kd, tiles.block_k), triton.cdiv(M, tiles.block_m))
    _grouped_wgrad_kernel[grid](x.contiguous(), dy, dw, offs, Kd, M, BLOCK_R=tiles.block_r,
                                BLOCK_K=tiles.block_k, BLOCK_M=tiles.block_m,
                                DOT_PRECISION=dot_input_precision(x.dtype),
                                num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, dtype):
        xc, wc = x.to(dtype).contiguous(), w.to(dtype)
        ctx.save_for_backward(xc, wc, offs)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return _forward(xc, wc, offs)

    @staticmethod
    def backward(ctx, dy):
        xc, wc, offs = ctx.saved_tensors
        dy = dy.to(wc.dtype).contiguous()
        dx = _forward(dy, wc.transpose(1, 2), offs).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = _wgrad(xc, dy, offs, wc.shape[0]).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """x [N, n] rows sorted by expert, w [E, n, m], tokens_per_expert [E] -> [N, m] in
    `gemm_dtype(x, w)`. backend: auto (`grouped_mm_backend`), torch (torch._grouped_mm), triton."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"grouped_mm: backend '{backend}' is not one of auto, torch, triton")
    dtype = gemm_dtype(x, w)
    offs = torch.zeros(len(tokens_per_expert) + 1, dtype=torch.int32, device=x.device)
    offs[1:] = torch.cumsum(tokens_per_expert.to(x.device), 0)
    if backend == "auto":
        chosen = grouped_mm_backend(dtype, x.shape[1], w.shape[2], device_arch(x.device))
        backend = "torch" if chosen == "torch_grouped_mm" else "triton"
    if backend == "torch":
        return torch._grouped_mm(x.to(dtype), w.to(dtype), offs=offs[1:].contiguous())
    return _GroupedMM.apply(x, w, offs, dtype)


def reference_grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """A loop over experts (plain matmuls: autocast casts them as it casts grouped_mm)."""
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
