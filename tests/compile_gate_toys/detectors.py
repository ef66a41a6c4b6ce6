"""One toy kernel per compile-gate detector, and a well-behaved dot for contrast."""
import triton
import triton.language as tl


@triton.jit
def spills(X, Y, N: tl.constexpr):
    """All N values of one warp stay live across the reduction: N / 32 registers per thread."""
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(Y + offs, x * tl.sum(x * x, 0))


@triton.jit
def deep_pipeline(A, B, C, K, BM: tl.constexpr, BK: tl.constexpr):
    """A K loop of [BM, BK] x [BK, BM] bf16 tiles: with aligned pointers Triton pipelines the loads
    (cp.async / TMA), each stage buffering both tiles in shared memory."""
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    a_ptrs = A + rm[:, None] * K + rk[None, :]
    b_ptrs = B + rk[:, None] * BM + rm[None, :]
    acc = tl.zeros([BM, BM], tl.float32)
    for _ in range(tl.cdiv(K, BK)):
        acc += tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))
        a_ptrs += BK
        b_ptrs += BK * BM
    tl.store(C + rm[:, None] * BM + rm[None, :], acc)


@triton.jit
def dot(A, B, C, M: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.arange(0, M)
    a = tl.load(A + r[:, None] * M + r[None, :])
    b = tl.load(B + r[:, None] * M + r[None, :])
    tl.store(C + r[:, None] * M + r[None, :], tl.dot(a, b, input_precision=PRECISION))


@triton.jit
def does_not_compile(X, N: tl.constexpr):
    tl.store(X + tl.arange(0, N), 1.0)  # arange needs a power of two


@triton.jit
def scalars(X, big, small, one, N: tl.constexpr):
    """For the recorder: how each int argument is typed."""
    tl.store(X + tl.arange(0, N), big + small + one)
