"""Grouped-query attention on the windowed kernel (megalong/kernels/window_attention.py): k and v
with fewer heads than q, indexed by group in the forward and the backward (dk, dv summed over the
group's query heads), against the float64 reference on k and v repeated per query head, and the
local and global modules on the kernel against their torch paths (interpreted on the CPU)."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, SMALL, assert_match, attn_config, rand
from megalong.kernels import window_attention as wa
from test_kernels import on_kernels_and_torch

GQA_CASES = [  # batch, heads, groups, L, head_dim, window, dilation, alibi, global keys, documents
    (2, 4, 2, 37, 16, 5, 3, True, [0, 7, 20], False),  # dilation, ALiBi, global keys, ragged L
    (1, 4, 1, 29, 16, None, 1, True, None, True),  # one group, full causal with documents
    (1, 6, 3, 21, 24, 4, 2, False, [3], True),  # head_dim padded, global key and documents
]


@pytest.mark.parametrize("b,h,g,L,D,window,dilation,alibi,global_keys,documents", GQA_CASES)
def test_window_kernel_with_groups_matches_reference(b, h, g, L, D, window, dilation, alibi, global_keys,
                                                      documents):
    q, k, v = rand(b, h, L, D, seed=0), rand(b, g, L, D, seed=1), rand(b, g, L, D, seed=2)
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(3)).to(DEVICE) if alibi else None
    keys = None if global_keys is None else torch.tensor(global_keys, device=DEVICE)
    seg = (torch.arange(L, device=DEVICE) * 3 // L).expand(b, L).contiguous() if documents else None
    got = wa.window_attention(q, k, v, 0.3, window, dilation, slopes, keys, blocks=SMALL, segment_ids=seg)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, window, dilation,
                                         None if slopes is None else slopes.double(), keys, segment_ids=seg)
    assert got[0].shape == (b, h, L, D)
    assert_match(got, want, (q, k, v))


def test_window_kernel_query_positions_with_groups():
    """Longformer's global rows (queries at given positions, full causal) with 2 groups of 2 heads."""
    L = 40
    q, k, v = rand(1, 4, 4, 16, seed=0), rand(1, 2, L, 16, seed=1), rand(1, 2, L, 16, seed=2)
    pos, slopes = torch.tensor([0, 7, 20, 39], device=DEVICE), torch.tensor([0.5, 0.1, 0.3, 0.2], device=DEVICE)
    got = wa.window_attention(q, k, v, 0.3, None, 1, slopes, None, pos, blocks=SMALL)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, None, 1, slopes.double(), None, pos)
    assert_match(got, want, (q, k, v))


def test_window_kernel_refuses_key_heads_that_do_not_divide_the_query_heads():
    q, k = rand(1, 4, 8, 16, seed=0), rand(1, 3, 8, 16, seed=1)
    with pytest.raises(ValueError, match="3 key / 3 value heads for 4 query heads"):
        wa.window_attention(q, k, k, 0.3, 4)


@pytest.mark.parametrize("kwargs,documents", [(dict(window=4, dilation=[1, 2, 1, 3], alibi=True), False),
                                              (dict(window=3, dilation=2, global_tokens=[0, 9]), True)])
def test_local_with_groups_on_the_kernel_equals_its_torch_path(kwargs, documents):
    """4 query heads, 2 groups: dilations that differ inside a group (the per-dilation buckets),
    global tokens (local then global groups) with packed documents."""
    from megalong.attention.local import LocalAttention

    heads, groups = 4, 2
    module = LocalAttention(attn_config(heads), 1, **kwargs)
    sets = 2 if kwargs.get("global_tokens") else 1
    q = rand(1, sets * heads, 19, 16, seed=0)
    k, v = rand(1, sets * groups, 19, 16, seed=1), rand(1, sets * groups, 19, 16, seed=2)
    seg = torch.tensor([[0] * 7 + [1] * 8 + [2] * 4], device=DEVICE) if documents else None
    assert_match(*on_kernels_and_torch(lambda: [module.attend(q, k, v, seg)]), (q, k, v))


@pytest.mark.parametrize("documents", [False, True])
def test_global_alibi_with_groups_on_the_kernel_equals_sdpa(documents):
    from megalong.attention.global_attention import GlobalAttention

    module = GlobalAttention(attn_config(4), 1, alibi=True)
    q, k, v = rand(1, 4, 21, 16, seed=0), rand(1, 1, 21, 16, seed=1), rand(1, 1, 21, 16, seed=2)
    seg = torch.tensor([[0] * 9 + [1] * 12], device=DEVICE)
    run = (lambda: [module.attend_documents(q, k, v, seg)]) if documents else (lambda: [module.attend(q, k, v)])
    assert_match(*on_kernels_and_torch(run), (q, k, v))
