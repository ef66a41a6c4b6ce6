"""What a kernel may use on each target GPU, and the rule for its tensor-core instructions.

Shared memory: the most dynamic shared memory one thread block may use (what Triton's launcher
checks `metadata.shared` against: `cudaFuncSetAttribute(..., MaxDynamicSharedMemorySize)`), from
the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (maximum shared
memory per thread block: 8.0 -> 163 KB, 9.0 -> 227 KB), and the A100 / H100 tuning guides
("up to 163 KB" / "up to 227 KB of shared memory" per thread block). 1 KB = 1024 bytes.

Tensor cores (a kernel whose TTIR has a `tt.dot`):
- sm_80: its SASS must hold HMMA (mma.sync); without it the dot runs on FMA units (e.g. float32
  with input_precision "ieee"), 10-30x slower.
- sm_90: HGMMA (wgmma) or HMMA. wgmma needs a warpgroup (4 warps) per 64 rows of the dot's result,
  so a kernel whose dots all have fewer than 64 rows, or that runs on fewer than 4 warps, cannot
  use it and HMMA is the tensor-core path Triton has: accepted. A kernel with a dot of >= 64 rows
  on a multiple of 4 warps that still has no HGMMA fails: it leaves the H100's wgmma throughput
  unused (e.g. a transposed float32 operand wgmma cannot read, or tiles chosen for sm_80).
"""
from __future__ import annotations

# Bytes of dynamic shared memory per block (see the module docstring).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

WGMMA_MIN_ROWS = 64
WARPGROUP = 4


def shared_limit(arch: int) -> int:
    if arch not in SHARED_LIMIT:
        raise ValueError(f"compile gate: no shared-memory limit known for sm_{arch} "
                         f"(known: {', '.join(f'sm_{a}' for a in sorted(SHARED_LIMIT))})")
    return SHARED_LIMIT[arch]


def tensor_core_problem(arch: int, dot_rows: list[int], num_warps: int, sass_ops: set[str]) -> str:
    """'' when the kernel's tensor-core instructions follow the rule above, else why not.
    dot_rows: the result rows of every `tt.dot` in the kernel (empty: no dot, nothing to check)."""
    if not dot_rows:
        return ""
    if arch >= 90:
        if "HGMMA" in sass_ops:
            return ""
        wgmma_sized = [m for m in dot_rows if m >= WGMMA_MIN_ROWS]
        if wgmma_sized and num_warps % WARPGROUP == 0:
            return (f"no wgmma (HGMMA) although a dot has {max(wgmma_sized)} rows on {num_warps} warps"
                    + ("; HMMA only" if "HMMA" in sass_ops else "; no tensor-core instruction"))
    if "HMMA" in sass_ops:
        return ""
    return "has tl.dot but no tensor-core instruction (HMMA/HGMMA) in its SASS"
