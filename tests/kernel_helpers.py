"""Shared by the kernel tests: device and interpreter check, tolerances, random inputs, the
output-and-gradient comparison, and a stand-in for the interpreter's memory access that records
addresses past a real allocation (to test offsets of tensors past 2^31 elements without one)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import triton  # noqa: F401  (a dev dependency: its absence is an error, not a skip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("the kernel tests need TRITON_INTERPRET=1 on a machine without CUDA "
                       "(tests/conftest.py sets it unless TRITON_INTERPRET is already set)")

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
SMALL = (16, 16, 1)  # block_m, block_n, num_warps: several tiles on small shapes


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()


def assert_match(outputs, references, inputs, seed=1):
    """Outputs and the gradients of a random linear function of them match the references'."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outputs]
    for o, r in zip(outputs, references):
        assert o.shape == r.shape
        assert (o.double() - r.double()).abs().max().item() < OUT_TOL
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), inputs)
    want = torch.autograd.grad(sum((r * w.to(r.dtype)).sum() for r, w in zip(references, weights)), inputs)
    for a, b in zip(got, want):
        assert (a.double() - b.double()).abs().max().item() < GRAD_TOL


def attn_config(heads, head_dim=16):
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


class FarMemory:
    """Stands in for the interpreter's memory access: loads and stores inside `tensors` run, those
    elsewhere are recorded (byte addresses) instead, loads returning zeros. Lets a kernel compute
    the addresses of a tensor past 2^31 elements without allocating it."""

    def __init__(self, memory, tensors):
        self.memory = memory
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
        self.loads, self.stores = [], []

    def __getattr__(self, name):
        return getattr(self.memory, name)

    def _inside(self, addresses):
        return any(((addresses >= lo) & (addresses < hi)).all() for lo, hi in self.ranges)

    def load(self, ptrs, mask, other, dtype):
        if self._inside(ptrs[mask]):
            return self.memory.load(ptrs, mask, other, dtype)
        self.loads.append(ptrs[mask].astype("int64"))
        return other.copy()

    def store(self, ptrs, value, mask):
        if self._inside(ptrs[mask]):
            return self.memory.store(ptrs, value, mask)
        self.stores.append(ptrs[mask].astype("int64"))


@pytest.fixture
def far_memory(monkeypatch):
    from triton.runtime import interpreter

    memory = interpreter._interpreter

    def install(*tensors):
        far = FarMemory(memory, tensors)
        monkeypatch.setattr(interpreter, "_interpreter", far)
        return far
    return install


def addresses(base: torch.Tensor, element_size: int, rows, row_len: int, cols) -> set:
    """Byte addresses of [rows x cols] of a row-major tensor at `base` with rows of row_len."""
    return {base.data_ptr() + element_size * (r * row_len + c) for r in rows for c in cols}


def sorted_rounds(b, h, n, L, c, seed=0, n_buckets=4):
    """LSH rounds sorted by random buckets of `n_buckets` (padding last): (order, chunk of each
    position, padded length)."""
    g = torch.Generator().manual_seed(seed)
    Lp = -(-L // c) * c
    buckets = torch.randint(0, n_buckets, (b, h, n, Lp), generator=g)
    buckets[..., L:] = n_buckets
    pos = torch.arange(Lp)
    order = torch.argsort(buckets * Lp + pos, -1)
    chunk_of = torch.empty_like(order).scatter_(-1, order, (pos // c).expand_as(order))
    return order.to(DEVICE), chunk_of.to(DEVICE), Lp
