"""64-bit offsets in the attention kernels, tested without a tensor past 2^31 elements.

`megalong.kernels.offsets.offset64` is what every attention kernel (windowed, FAM, LSH, linear)
uses for the base offset of its (batch, head) slice. Checked here: its arithmetic against Python
ints where an int32 product would wrap, and the addresses the windowed kernel reads and writes for
a batch index whose slice starts past 2^31 elements (recorded by kernel_helpers.FarMemory instead
of touching memory; the MoE kernels' rows are tested the same way in tests/test_kernels_moe.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernel_helpers import DEVICE, addresses
from kernel_helpers import far_memory  # noqa: F401  (a fixture)
from megalong.kernels import window_attention as wa
from megalong.kernels.offsets import offset64

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="runs kernels under the CPU interpreter")


@triton.jit
def _offset_probe(OUT, index, stride, N: tl.constexpr):
    """OUT[:N] = offset64(index + i, stride); OUT[N:2N] the same product in int32; OUT[2N + pid]
    = offset64(program id, stride)."""
    i = index + tl.arange(0, N)
    tl.store(OUT + tl.arange(0, N), offset64(i, stride))
    tl.store(OUT + N + tl.arange(0, N), (i * stride).to(tl.int64))
    pid = tl.program_id(0)
    tl.store(OUT + 2 * N + pid, offset64(pid, stride))


def test_offset64_does_not_wrap_past_2_31():
    index, stride, n, programs = 70_001, 2**15 + 7, 4, 3  # index * stride > 2^31, both fit int32
    out = torch.zeros(2 * n + programs, dtype=torch.int64)
    _offset_probe[(programs,)](out, index, stride, N=n)
    want = [(index + i) * stride for i in range(n)]
    assert want[0] > 2**31
    assert out[:n].tolist() == want
    assert out[n:2 * n].tolist() != want  # what an int32 product gives: wrapped
    big_stride = 2**30 + 3
    out = torch.zeros(2 * n + programs, dtype=torch.int64)
    _offset_probe[(programs,)](out, 0, big_stride, N=n)
    assert out[2 * n:].tolist() == [p * big_stride for p in range(programs)]


def test_window_kernel_addresses_batches_past_2_31_elements(far_memory):  # noqa: F811
    """Batch strides of 2^30 + 16 elements: batch 2's slice starts past 2^31; the kernel must read
    q, k, v and write o exactly there (batch 0 lies in the real tensors and runs normally)."""
    L = D = 16
    batch_stride = 2**30 + 16
    q, k, v, o = (torch.zeros(1, 1, L, D) for _ in range(4))
    lse = torch.zeros(3, L)
    dummy = torch.zeros(1, dtype=torch.int32)
    far = far_memory(q, k, v, o, lse, dummy)
    strides = (batch_stride, 0, D)
    wa._window_fwd[(1, 3)](q, k, v, o, lse, dummy, dummy, dummy, dummy, dummy, dummy, *strides, *strides, *strides,
                           *strides, 1, 1, L, L, 0, L, 1, 1.0, HAS_ALIBI=False, HAS_QPOS=False,
                           HAS_GLOBAL=False, HAS_SEG=False, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=16,
                           BLOCK_N=16, DOT_PRECISION="ieee")

    def slices(t):
        return set().union(*(addresses(t, 4, range(b * batch_stride // D, b * batch_stride // D + L), D,
                                       range(D)) for b in (1, 2)))
    assert max(slices(q)) - q.data_ptr() > 4 * 2**31
    assert set(np.concatenate(far.loads).tolist()) == slices(q) | slices(k) | slices(v)
    assert set(np.concatenate(far.stores).tolist()) == slices(o)
