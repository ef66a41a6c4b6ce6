"""Deterministic memory accounting for attention tests (shared by the attention-kind tests).

`MemoryTracker` is a TorchDispatchMode that sees every tensor an operator creates, in the forward
and in the backward (the autograd engine carries the mode into the backward on the CPU). It counts
each new storage's bytes while the storage is alive (a weak-reference finalizer on the storage, which
PyTorch keeps as long as any tensor, saved-for-backward ones included, holds it), so `peak` is the
largest number of bytes that operators had allocated and not yet freed at any moment: the
allocator's peak without its caching, the same on every run. Inputs created before the tracker
started are not counted. `largest` is the most elements of any one tensor created (to catch an
L x L tensor even when it is freed at once).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0
        self.largest_shape: tuple = ()

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.numel() > self.largest:
                self.largest, self.largest_shape = t.numel(), tuple(t.shape)
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live:
                continue  # a view, or an output written into an existing storage
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def forward_backward_memory(attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                            length: int, heads: int = 2, head_dim: int = 8, batch: int = 1,
                            dtype: torch.dtype = torch.float32) -> MemoryTracker:
    """Track one forward and backward of `attention` on random q, k, v in megatron's layout
    [length, batch, heads, head_dim]; returns the tracker (`peak` bytes, `largest` elements)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(length, batch, heads, head_dim, generator=g, dtype=dtype, requires_grad=True)
               for _ in range(3)]
    grad = torch.randn(length, batch, heads * head_dim, generator=g, dtype=dtype)
    tracker = MemoryTracker()
    with tracker:
        out = attention(q, k, v)
        out.backward(grad)
        del out
    return tracker
