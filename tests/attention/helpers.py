"""What the attention tests share: inputs in float64, megatron's config and tensor-parallel groups
faked for one core-attention module, the naive masked reference on megatron's layout, the
forward-and-gradient comparison, small configs and models, and deterministic memory accounting.

The reference itself is megalong/attention/reference.py (naive O(L^2) attention with an explicit
mask, written for obviousness); this module only adapts it to the tests' shapes.

Memory: `MemoryTracker` is a TorchDispatchMode that sees every tensor an operator creates, in the
forward and in the backward (the autograd engine carries the mode into the backward on the CPU). It
counts each new storage's bytes while the storage is alive (a weak-reference finalizer on the
storage, which PyTorch keeps as long as any tensor, saved-for-backward ones included, holds it), so
`peak` is the largest number of bytes that operators had allocated and not yet freed at any
moment: the allocator's peak without its caching, the same on every run. Inputs created before the
tracker started are not counted. `largest` is the most elements of any one tensor created (to catch
an L x L tensor even when it is freed at once).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megalong.attention.alibi import alibi_slopes
from megalong.attention.options import ATTENTION_OPTIONS
from megalong.attention.reference import alibi_bias_matrix, reference_attention

D = 8  # head dim of the small test modules


# ------------------------------------------------------------------------------------------------
# modules and inputs
# ------------------------------------------------------------------------------------------------

def attention_config(heads: int, head_dim: int = D) -> SimpleNamespace:
    """The fields of megatron's TransformerConfig that a core-attention module reads."""
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


def tp(rank: int, size: int) -> SimpleNamespace:
    """A pg_collection whose tensor-parallel group is rank `rank` of `size` (no processes): a
    module built with it holds that rank's heads, by global head index."""
    return SimpleNamespace(tp=SimpleNamespace(rank=lambda: rank, size=lambda: size))


def qkv(L: int, heads: int, head_dim: int = D, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v in megatron's layout [L, batch, heads, head_dim], float64, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, batch, heads, head_dim, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(3)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


def supports_alibi(kind: str) -> bool:
    """Whether the kind has attention scores for ALiBi to bias (its options class says so)."""
    return ATTENTION_OPTIONS[kind].supports_alibi


# ------------------------------------------------------------------------------------------------
# layouts and the reference
# ------------------------------------------------------------------------------------------------

def bhld(x: torch.Tensor) -> torch.Tensor:
    """megatron's [L, b, h, d] -> the reference's [b, h, L, d]."""
    return x.permute(1, 2, 0, 3)


def sbh(x: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] -> megatron's core-attention output [L, b, h * d]."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1)


def reference_sbh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The naive masked reference on megatron's layout: q, k, v [L, b, h, d] -> [L, b, h * d]."""
    return sbh(reference_attention(bhld(q), bhld(k), bhld(v), mask, scale, bias))


def alibi_reference_bias(heads: int, L: int) -> torch.Tensor:
    """[1, heads, L, L]: -slope_h * (i - j), element by element, the paper's slopes."""
    return alibi_bias_matrix(alibi_slopes(heads), L).unsqueeze(0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_close_with_grads(out: torch.Tensor, ref: torch.Tensor, inputs: Sequence[torch.Tensor],
                            tol: float) -> None:
    """`out` equals `ref` within `tol`, and so do their gradients w.r.t. `inputs` for one random
    output gradient."""
    assert max_diff(out, ref) < tol
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, grad, retain_graph=True)
    for a, b in zip(got, want):
        assert max_diff(a, b) < tol


# ------------------------------------------------------------------------------------------------
# configs and models
# ------------------------------------------------------------------------------------------------

def model_config(**model: Any) -> Any:
    """A validated config of a small model (1 layer of `global`, 4 heads, 16 positions unless set)."""
    from megalong.config import config_from_dict, validate

    base = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 16,
            "attention_layers": ["global"]}
    cfg = config_from_dict({"model": {**base, **model}})
    validate(cfg, check_paths=False)
    return cfg


def small_model(attention_layers: list, attention: dict, seq: int = 24, heads: int = 4, alibi: bool = False,
                layers: int = 1, tensor: int = 1, **model: Any) -> torch.nn.Module:
    """A float64 model of head_dim 8 and a 64-token vocabulary, built from the config with seed 0
    (needs megatron's process groups: see the `one_process` fixture)."""
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model

    cfg = config_from_dict({"model": {
        "num_layers": layers, "hidden_size": 8 * heads, "num_attention_heads": heads,
        "max_position_embeddings": seq, "attention_layers": attention_layers, "attention": attention,
        "alibi": alibi, "position_embedding": "none" if alibi else "learned", **model},
        "parallel": {"tensor": tensor}})
    validate(cfg, check_paths=False, world_size=tensor)
    torch.manual_seed(0)
    return build_model(cfg, 64).double()


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------

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


def largest_created(run: Callable[[], Any]) -> int:
    """The most elements of any one tensor that an operator creates while `run()` runs."""
    tracker = MemoryTracker()
    with tracker:
        run()
    return tracker.largest


def head_index(sets: int, heads: int, rank: int, size: int) -> list[int]:
    """Indices of rank `rank`'s heads when the module's input holds `sets` groups of `heads` heads
    one after another (local with global tokens: the local heads, then the global-projection heads)."""
    per = heads // size
    return [s * heads + rank * per + i for s in range(sets) for i in range(per)]

