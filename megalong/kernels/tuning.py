"""Launch settings of the attention kernels per GPU architecture, and the `tl.dot` precision rule.

One table for every attention kernel (windowed, FAM, LSH, linear): tile sizes, warps and stages as
a function of (arch, head_dim, dtype), arch from `megalong.kernels.arch.device_arch` (90: sm_90,
80: sm_80 and the other Ampere/Ada parts, 0: the CPU interpreter). Chosen by compiling every launch
the launchers make at B=1, 16 heads, L=8192, head_dim 64 and 128, bf16 and float32, for sm_90 and
sm_80 (the compile gate): no spills, shared memory within sm_80's 163 KiB.

`dot_input_precision`: float32 operands run as "tf32x3" (three TF32 products that recover float32
accuracy, on the tensor cores) while torch's float32 matmul precision is "highest" (its default),
and as "tf32" when a user lowered it (`torch.set_float32_matmul_precision("high")`); Triton's
default would be plain TF32 (~1e-3 relative), which the CPU interpreter (exact float32) cannot
show. 16-bit operands multiply exactly into the float32 accumulator ("ieee": the setting does not
apply to them). Every `tl.dot` of every kernel takes its precision from this rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalong.kernels.arch import device_arch


def dot_input_precision(dtype: torch.dtype, float32_precision: Optional[str] = None) -> str:
    """`tl.dot`'s input_precision for operands of `dtype`; float32_precision defaults to
    `torch.get_float32_matmul_precision()`."""
    if dtype != torch.float32:
        return "ieee"
    precision = float32_precision or torch.get_float32_matmul_precision()
    return "tf32x3" if precision == "highest" else "tf32"


@dataclass(frozen=True)
class AttentionTiles:
    block_m: int  # query rows per program
    block_n: int  # keys per step
    num_warps: int
    num_stages: int


def window_tiles(arch: int, head_dim: int, dtype: torch.dtype, backward: bool) -> AttentionTiles:
    """Tiles of the windowed and FAM kernels (forward or backward); arch 0 (the interpreter) takes
    sm_90's. Forward and backward share block_m (the query blocks of `q_positions` are cut once)."""
    if dtype.itemsize > 2:  # tf32x3 splits every float32 operand in two: half the rows and keys
        if arch > 0 and head_dim > 64:  # 32 query rows spill: sm_80 8 B/thread in the forward, sm_90
            # 148 with global tokens + ALiBi and 44 in the FAM forward
            return AttentionTiles(16, 16, 4, 1) if backward else AttentionTiles(16, 32, 4, 2)
        return AttentionTiles(32, 16, 8, 1) if backward else AttentionTiles(32, 32, 8, 2)
    wide = head_dim > 64
    if not backward:
        return AttentionTiles(64, 32 if wide else 64, 8 if wide else 4, 2)
    return AttentionTiles(64, 32, 8, 1)


def lsh_tiles(arch: int, head_dim: int, dtype: torch.dtype, backward: bool) -> AttentionTiles:
    """Tiles of the LSH kernels: block_m query rows of a chunk per program, block_n keys per step
    (the launcher caps both at the chunk); arch 0 (the interpreter) takes 16 x 16 on one warp."""
    if arch == 0:
        return AttentionTiles(16, 16, 1, 1)
    if dtype.itemsize > 2:  # tf32x3: the backward's 32 x 16 tiles spill (sm_90 112, sm_80 32 B/thread)
        return AttentionTiles(16, 16, 4, 1) if backward else AttentionTiles(32, 16, 8, 1)
    if not backward:
        return AttentionTiles(64, 64, 4 if head_dim <= 64 else 8, 2)
    return AttentionTiles(64, 64 if arch >= 90 else 32, 8, 1)


@dataclass(frozen=True)
class LinearTiles:
    block_e: int  # value columns per program (the [D, block_e] state lives in its registers)
    block_d: int  # feature columns per program of the dq and dk kernels ([block_d, E] state)
    num_warps: int


def linear_kernel_covers(dtype: torch.dtype, d: int, e: int) -> bool:
    """Whether `linear` runs its kernel for operands of `dtype` with features of width d and values
    of width e: 16-bit operands only. float32 is left to the torch chunked path (cuBLAS): the
    kernels keep a [d, block_e] float32 state as a tf32x3 `tl.dot` operand, which spills on sm_90
    at head_dim 64 (464-1164 B/thread) and 128 (every tile tried, 104-2108; bench/RESULTS.md,
    compile gate)."""
    return dtype.itemsize <= 2


def linear_tiles(arch: int, d: int, e: int, dtype: torch.dtype) -> LinearTiles:
    """Tiles of the linear-attention kernels for features of width d and values of width e."""
    if arch == 0:
        return LinearTiles(16, 16, 1)
    if 0 < arch < 90 and max(d, e) > 64:  # sm_80: a [32, 128] state spills 20 B/thread in dq
        return LinearTiles(32, 16, 8)
    return LinearTiles(32, 32, 8 if max(d, e) > 64 or dtype.itemsize > 2 else 4)


def attention_launch_tiles(device: torch.device, head_dim: int, dtype: torch.dtype,
                           blocks: Optional[tuple[int, int, int]] = None
                           ) -> tuple[AttentionTiles, AttentionTiles]:
    """(forward, backward) tiles of the windowed and FAM kernels on `device`; `blocks` =
    (block_m, block_n, num_warps) overrides both (the tests' small tiles)."""
    if blocks is not None:
        block_m, block_n, num_warps = blocks
        return AttentionTiles(block_m, block_n, num_warps, 2), AttentionTiles(block_m, block_n, num_warps, 1)
    arch = device_arch(device)
    return window_tiles(arch, head_dim, dtype, False), window_tiles(arch, head_dim, dtype, True)
