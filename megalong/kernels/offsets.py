"""64-bit base offsets for the kernels' tensors.

A [B, H, L, D] tensor passes 2^31 elements at, e.g., L = 128k, 16 heads, head_dim 128 and B >= 9;
a product of program ids and strides computed in int32 would wrap there. Every kernel computes the
offset of its (batch, head, ...) slice with `offset64`, so pointer arithmetic from there on is in
int64.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def offset64(index, stride):
    """index * stride in int64 (index: a program id or an int32 scalar or block)."""
    return index.to(tl.int64) * stride
