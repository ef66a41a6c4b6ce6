"""The ALiBi option (model.alibi): the paper's slopes, `global` and `local` with ALiBi against the
naive reference with 12 heads (not a power of two), and the slopes of a tensor-parallel rank's
heads taken by global head index. The other kinds' ALiBi is checked in their own files."""
import math

import pytest
import torch

from attention.helpers import (
    alibi_reference_bias,
    assert_close_with_grads,
    attention_config,
    max_diff,
    qkv,
    reference_sbh,
    tp,
)
from megalong.attention.alibi import alibi_slopes
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention
from megalong.attention.reference import causal_mask, sliding_window_mask

TOL = 1e-6


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    # 12 heads (not a power of two): the 8 slopes of n=8, then every other slope of n=16.
    sixteen = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    expected = [2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("kind,window", [("global", None), ("local", 4), ("local", 5)])
def test_alibi_equals_reference_with_12_heads(kind, window):
    L, heads = 11, 12
    q, k, v = qkv(L, heads)
    if kind == "global":
        module, mask = GlobalAttention(attention_config(heads), 1, alibi=True), causal_mask(L)
    else:
        module = LocalAttention(attention_config(heads), 1, alibi=True, window=window)
        mask = sliding_window_mask(L, window)
    module = module.double()
    ref = reference_sbh(q, k, v, mask, module.scale, alibi_reference_bias(heads, L))
    assert_close_with_grads(module(q, k, v), ref, (q, k, v), TOL)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_alibi_under_tensor_parallel_uses_global_head_index(kind):
    """Each TP=2 rank holds 6 of 12 heads; its slopes must be those of heads 6r..6r+5."""
    L, heads = 9, 12
    q, k, v = qkv(L, heads)
    cls, extra, mask = ((GlobalAttention, {}, causal_mask(L)) if kind == "global" else
                        (LocalAttention, {"window": 3}, sliding_window_mask(L, 3)))
    full = cls(attention_config(heads), 1, alibi=True, **extra).double()(q, k, v)
    halves = []
    for rank in range(2):
        module = cls(attention_config(heads), 1, alibi=True, pg_collection=tp(rank, 2), **extra).double()
        assert module.first_head == 6 * rank
        sl = slice(6 * rank, 6 * rank + 6)
        halves.append(module(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
    assert max_diff(torch.cat(halves, dim=-1), full) < 1e-12
    assert max_diff(full, reference_sbh(q, k, v, mask, 1 / math.sqrt(8), alibi_reference_bias(heads, L))) < TOL
