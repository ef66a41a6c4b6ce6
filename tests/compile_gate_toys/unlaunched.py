"""A kernel with a helper, and a kernel nothing launches (for the discovery check)."""
import triton
import triton.language as tl


@triton.jit
def _helper(x):
    return x * 2


@triton.jit
def launched(X, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(X + offs, _helper(tl.load(X + offs)))


@triton.jit
def forgotten(X, N: tl.constexpr):
    tl.store(X + tl.arange(0, N), 0.0)
