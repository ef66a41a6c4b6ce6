"""`global`: full causal attention against the naive masked reference, in float64."""
import math

import pytest

from attention.helpers import (
    assert_close_with_grads,
    attention_config,
    max_diff,
    qkv,
    reference_sbh,
)
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.reference import causal_mask

TOL = 1e-6


@pytest.mark.parametrize("softmax_scale", [None, 1.0])
def test_global_equals_reference(softmax_scale):
    q, k, v = qkv(11, 4)
    module = GlobalAttention(attention_config(4), 1, softmax_scale=softmax_scale).double()
    assert module.scale == (1.0 if softmax_scale else 1 / math.sqrt(8))
    assert_close_with_grads(module(q, k, v), reference_sbh(q, k, v, causal_mask(11), module.scale), (q, k, v), TOL)


def test_grouped_query_heads_are_shared():
    q, _, _ = qkv(6, 4)
    k, v, _ = qkv(6, 2, seed=1)
    out = GlobalAttention(attention_config(4), 1).double()(q, k, v)
    k_full, v_full = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    assert max_diff(out, reference_sbh(q, k_full, v_full, causal_mask(6), 1 / math.sqrt(8))) < TOL
