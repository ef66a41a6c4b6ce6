"""Every attention kind of the registry against the naive O(L^2) reference, in float64."""
import math
from types import SimpleNamespace

import pytest
import torch

from megalong.attention.alibi import alibi_slopes
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention
from megalong.attention.reference import (alibi_bias_matrix, causal_mask, reference_attention,
                                          sliding_window_mask)

TOL = 1e-6


def _config(heads, head_dim=8):
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


def _tp(rank, size):
    group = SimpleNamespace(rank=lambda: rank, size=lambda: size)
    return SimpleNamespace(tp=group)


def _qkv(L, heads, head_dim=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, batch, heads, head_dim, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(3)]


def _ref(q, k, v, mask, scale, bias=None):
    """Reference on megatron's [s, b, h, d] layout."""
    out = reference_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), mask, scale, bias)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _assert_same_forward_and_grads(module, q, k, v, mask, bias=None):
    out = module(q, k, v)
    ref = _ref(q, k, v, mask, module.scale, bias)
    assert (out - ref).abs().max().item() < TOL
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("softmax_scale", [None, 1.0])
def test_global_equals_reference(softmax_scale):
    q, k, v = _qkv(11, 4)
    module = GlobalAttention(_config(4), 1, softmax_scale=softmax_scale).double()
    assert module.scale == (1.0 if softmax_scale else 1 / math.sqrt(8))
    _assert_same_forward_and_grads(module, q, k, v, causal_mask(11))


@pytest.mark.parametrize("L,window", [(16, 4), (13, 5), (9, 1), (10, 3), (7, 7), (12, 64)])
def test_local_equals_reference(L, window):
    q, k, v = _qkv(L, 4)
    module = LocalAttention(_config(4), 1, window=window).double()
    _assert_same_forward_and_grads(module, q, k, v, sliding_window_mask(L, window))


def test_local_with_window_at_least_length_equals_global():
    q, k, v = _qkv(10, 2)
    local = LocalAttention(_config(2), 1, window=10).double()(q, k, v)
    full = GlobalAttention(_config(2), 1).double()(q, k, v)
    assert (local - full).abs().max().item() < 1e-12


def test_grouped_query_heads_are_shared():
    q, _, _ = _qkv(6, 4)
    k, v, _ = _qkv(6, 2, seed=1)
    out = GlobalAttention(_config(4), 1).double()(q, k, v)
    k_full, v_full = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    assert (out - _ref(q, k_full, v_full, causal_mask(6), 1 / math.sqrt(8))).abs().max().item() < TOL


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    # 12 heads (not a power of two): the 8 slopes of n=8, then every other slope of n=16.
    sixteen = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    expected = [2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("kind,window", [("global", None), ("local", 4), ("local", 5)])
def test_alibi_equals_reference_with_12_heads(kind, window):
    L, heads = 11, 12
    q, k, v = _qkv(L, heads)
    if kind == "global":
        module, mask = GlobalAttention(_config(heads), 1, alibi=True), causal_mask(L)
    else:
        module, mask = LocalAttention(_config(heads), 1, alibi=True, window=window), sliding_window_mask(L, window)
    bias = alibi_bias_matrix(alibi_slopes(heads), L).unsqueeze(0)
    _assert_same_forward_and_grads(module.double(), q, k, v, mask, bias)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_alibi_under_tensor_parallel_uses_global_head_index(kind):
    """Each TP=2 rank holds 6 of 12 heads; its slopes must be those of heads 6r..6r+5."""
    L, heads = 9, 12
    q, k, v = _qkv(L, heads)
    cls, extra, mask = ((GlobalAttention, {}, causal_mask(L)) if kind == "global" else
                        (LocalAttention, {"window": 3}, sliding_window_mask(L, 3)))
    full = cls(_config(heads), 1, alibi=True, **extra).double()(q, k, v)
    halves = []
    for rank in range(2):
        module = cls(_config(heads), 1, alibi=True, pg_collection=_tp(rank, 2), **extra).double()
        assert module.first_head == 6 * rank
        sl = slice(6 * rank, 6 * rank + 6)
        halves.append(module(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
    assert (torch.cat(halves, dim=-1) - full).abs().max().item() < 1e-12
    bias = alibi_bias_matrix(alibi_slopes(heads), L).unsqueeze(0)
    assert (full - _ref(q, k, v, mask, 1 / math.sqrt(8), bias)).abs().max().item() < TOL


def test_local_never_builds_a_length_squared_tensor():
    """Peak memory of local attention grows ~linearly in L (blocks of `window` queries)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []
    for L in (512, 2048):
        q, k, v = [torch.randn(L, 1, 2, 8) for _ in range(3)]
        module = LocalAttention(_config(2), 1, window=32)
        largest = 0

        def track(*tensors):
            nonlocal largest
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())

        class Track(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                track(*(out if isinstance(out, (tuple, list)) else (out,)))
                return out

        with Track():
            module(q, k, v)
        sizes.append(largest)
        assert largest < L * L  # never an L x L tensor (2 heads x L x 2*window elements at most)
    assert sizes[1] <= 4.5 * sizes[0]
