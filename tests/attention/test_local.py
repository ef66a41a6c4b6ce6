"""`local`: the sliding window (GPT-Neo), dilation per head and Longformer's global tokens,
against explicit-mask O(L^2) references in float64; no L x L tensor."""
from functools import partial

import pytest
import torch

from attention.helpers import (
    D,
    alibi_reference_bias,
    assert_close_with_grads,
    attention_config,
    largest_created,
    max_diff,
    qkv,
    reference_sbh,
)
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention
from megalong.attention.reference import causal_mask, explicit_mask, sliding_window_mask

TOL = 1e-9


@pytest.mark.parametrize("L,window", [(16, 4), (13, 5), (9, 1), (10, 3), (7, 7), (12, 64)])
def test_local_equals_reference(L, window):
    q, k, v = qkv(L, 4)
    module = LocalAttention(attention_config(4), 1, window=window).double()
    assert_close_with_grads(module(q, k, v), reference_sbh(q, k, v, sliding_window_mask(L, window), module.scale),
                            (q, k, v), 1e-6)


def test_local_with_window_at_least_length_equals_global():
    q, k, v = qkv(10, 2)
    full = GlobalAttention(attention_config(2), 1)(q, k, v)
    assert max_diff(LocalAttention(attention_config(2), 1, window=10)(q, k, v), full) < 1e-12
    # Global tokens whose projections equal the local ones (as initialised) change nothing then.
    with_globals = LocalAttention(attention_config(2), 1, window=12, global_tokens=[0, 4])
    cat = [torch.cat([x, x], 2) for x in (q, k, v)]
    assert max_diff(with_globals(*cat), full) < 1e-12


def test_local_never_builds_a_length_squared_tensor():
    """The largest tensor of local attention grows ~linearly in L (blocks of `window` queries)."""
    sizes = []
    for L in (512, 2048):
        q, k, v = [torch.randn(L, 1, 2, D) for _ in range(3)]
        module = LocalAttention(attention_config(2), 1, window=32)
        largest = largest_created(partial(module, q, k, v))
        sizes.append(largest)
        assert largest < L * L  # never an L x L tensor (2 heads x L x 2*window elements at most)
    assert sizes[1] <= 4.5 * sizes[0]


# ------------------------------------------------------------------------------------------------
# dilation and global tokens
# ------------------------------------------------------------------------------------------------

def _dilated_masks(L, window, dilations):
    return torch.stack([explicit_mask(L, lambda i, j, d=d: j <= i and (i - j) % d == 0 and (i - j) // d < window)
                        for d in dilations])


@pytest.mark.parametrize("L,window,dilation,alibi", [
    (13, 3, [1, 2, 3, 1], False), (16, 4, 2, False), (17, 2, [3, 1, 2, 5], True), (9, 4, [1, 1, 2, 2], True)])
def test_local_dilation_equals_explicit_mask(L, window, dilation, alibi):
    heads = 4
    q, k, v = qkv(L, heads)
    module = LocalAttention(attention_config(heads), 1, window=window, dilation=dilation, alibi=alibi)
    dilations = dilation if isinstance(dilation, list) else [dilation] * heads
    bias = alibi_reference_bias(heads, L) if alibi else None
    ref = reference_sbh(q, k, v, _dilated_masks(L, window, dilations), module.scale, bias)
    assert_close_with_grads(module(q, k, v), ref, (q, k, v), TOL)


def _global_token_reference(q, k, v, qg, kg, vg, L, window, dilations, globals_, scale, bias):
    """Longformer: a global row is causal attention with the global projections; any other row sees
    its (dilated) window and the global tokens before it, with the ordinary projections."""
    local_masks = torch.stack([explicit_mask(L, lambda i, j, d=d: j <= i and (
        ((i - j) % d == 0 and (i - j) // d < window) or j in globals_)) for d in dilations])
    local = reference_sbh(q, k, v, local_masks, scale, bias)
    full = reference_sbh(qg, kg, vg, causal_mask(L), scale, bias)
    is_global = torch.tensor([i in globals_ for i in range(L)]).view(L, 1, 1)
    return torch.where(is_global, full, local)


@pytest.mark.parametrize("L,window,dilation,global_tokens,alibi", [
    (11, 3, 1, 2, False), (12, 2, [1, 2], [0, 5, 6], False), (13, 3, [2, 1], [1, 12], True), (6, 2, 1, [3, 9], False)])
def test_local_global_tokens_equal_explicit_reference(L, window, dilation, global_tokens, alibi):
    heads = 2
    q, k, v = qkv(L, heads)
    qg, kg, vg = qkv(L, heads, seed=1)
    module = LocalAttention(attention_config(heads), 1, window=window, dilation=dilation,
                            global_tokens=global_tokens, alibi=alibi)
    globals_ = set(range(global_tokens)) if isinstance(global_tokens, int) else set(global_tokens)
    dilations = dilation if isinstance(dilation, list) else [dilation] * heads
    out = module(torch.cat([q, qg], 2), torch.cat([k, kg], 2), torch.cat([v, vg], 2))
    ref = _global_token_reference(q, k, v, qg, kg, vg, L, window, dilations, globals_, module.scale,
                                  alibi_reference_bias(heads, L) if alibi else None)
    assert_close_with_grads(out, ref, (q, k, v, qg, kg, vg), TOL)
