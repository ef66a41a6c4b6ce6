"""The attention kernels in bf16 at real sizes on CUDA against float32 references (skipped without CUDA).

Run on the lent GPU: `python -m pytest -q tests/gpu`. Each kernel is called through its public
function and each attention kind's module through its `attend` (FAM: `blocks`) on bf16 tensors;
the reference gets float32 copies of the same values and cannot take a kernel: a reference
function in plain torch, or the module with `execution.kernels: reference` (`torch_path`). A spy on
Triton launches asserts that the kernel path really ran, forward and backward.

Thresholds (relative error, see gpu_compare.py): outputs and gradients < REL = 1e-2, the
log-sum-exp (float32 in both, over bf16 scores) < LSE_REL = 1e-3; the lsh module < 2 * REL (its
torch glue also runs in bf16 on the kernel path: the normalised keys, the rounds' combination; a
CPU dry run with the interpreted kernels measured 3e-3 for the kernels, 6e-3 for the lsh module).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import gpu_compare as gc
from gpu_compare import compare, kernel_launches, launched_from, pair, torch_path

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]

REL, LSE_REL = 1e-2, 1e-3


def _slopes(heads: int) -> torch.Tensor:
    from megalong.attention.alibi import alibi_slopes

    return alibi_slopes(heads).float().to(gc.DEVICE)


def _config(heads: int, head_dim: int) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


def _qkv(b: int, h: int, L: int, d: int):
    """Three (bf16, float32) input pairs [b, h, L, d]."""
    return [pair(b, h, L, d, seed=s) for s in range(3)]


# ---- kernels through their public functions ----------------------------------------------------

WINDOW_CASES = [  # batch, heads, L, head_dim, window, dilation, alibi, number of global keys
    (1, 4, 8192, 64, 256, 1, True, 0),
    (2, 4, 4096, 128, 1024, 1, False, 0),
    (1, 4, 4096, 64, 128, 2, True, 16),
    (1, 4, 4096, 128, 256, 4, False, 8),
    (1, 4, 2048, 128, None, 1, True, 0),  # full causal with ALiBi (global attention's kernel)
]


@pytest.mark.parametrize("b,h,L,d,window,dilation,alibi,n_global", WINDOW_CASES)
def test_window_attention(b, h, L, d, window, dilation, alibi, n_global):
    from megalong.kernels.window_attention import reference_window_attention, window_attention

    (q, qr), (k, kr), (v, vr) = _qkv(b, h, L, d)
    slopes = _slopes(h) if alibi else None
    keys = torch.arange(0, L, L // n_global, device=gc.DEVICE) if n_global else None
    scale = d ** -0.5
    with kernel_launches() as seen:
        got = window_attention(q, k, v, scale, window, dilation, slopes, keys)
        want = reference_window_attention(qr, kr, vr, scale, window, dilation, slopes, keys)
        compare(got, want, (q, k, v), (qr, kr, vr), REL, REL)  # (out, lse); gradients through both
    assert launched_from(seen, "window_attention") == 2  # forward and backward
    assert gc.rel(got[1], want[1]) < LSE_REL


@pytest.mark.parametrize("L,d", [(4096, 64), (4096, 128)])
def test_window_attention_query_positions(L, d):
    """Rows at given positions over the whole causal prefix (Longformer's global-token rows)."""
    from megalong.kernels.window_attention import reference_window_attention, window_attention

    h = 4
    (q, qr) = pair(1, h, 16, d, seed=0)
    (k, kr), (v, vr) = pair(1, h, L, d, seed=1), pair(1, h, L, d, seed=2)
    pos = torch.arange(0, L, L // 16, device=gc.DEVICE)
    with kernel_launches() as seen:
        got = window_attention(q, k, v, d ** -0.5, None, 1, _slopes(h), None, pos)
        want = reference_window_attention(qr, kr, vr, d ** -0.5, None, 1, _slopes(h), None, pos)
        compare(got, want, (q, k, v), (qr, kr, vr), REL, REL)
    assert launched_from(seen, "window_attention") == 2


FAM_CASES = [  # batch, heads, L, head_dim, block_size, memory_segments, fam_length, alibi
    (1, 4, 8192, 64, 1024, 1, 64, True),
    (2, 4, 4096, 128, 512, 2, 64, False),
    (1, 4, 4000, 128, 256, 1, 0, True),  # no FAM tokens, ragged last block
]


def _fam_module(h, d, block_size, memory, fam_length, alibi):
    from megalong.attention.fam import FamAttention

    return FamAttention(_config(h, d), 1, block_size=block_size, memory_segments=memory,
                        fam_length=fam_length, alibi=alibi)


def _fam_inputs(b, h, L, d, block_size, fam_length):
    n = -(-L // block_size)
    qkv = _qkv(b, h, L, d)
    fam = [pair(b, h, n, fam_length, d, seed=s) for s in (3, 4)] if fam_length else []
    return qkv + fam


@pytest.mark.parametrize("b,h,L,d,block_size,memory,fam_length,alibi", FAM_CASES)
def test_fam_block_attention(b, h, L, d, block_size, memory, fam_length, alibi):
    from megalong.kernels.fam_attention import fam_block_attention

    module = _fam_module(h, d, block_size, memory, fam_length, alibi)
    pairs = _fam_inputs(b, h, L, d, block_size, fam_length)
    got_in, want_in = [p[0] for p in pairs], [p[1] for p in pairs]
    kf, vf = (got_in[3], got_in[4]) if fam_length else (None, None)
    with kernel_launches() as seen:
        got = fam_block_attention(*got_in[:3], kf, vf, module.scale, block_size, memory,
                                  _slopes(h) if alibi else None)
        with torch_path():
            want = module.blocks(*want_in[:3], *(want_in[3:] or (None, None)))
        compare([got], [want], got_in, want_in, REL, REL)
    assert launched_from(seen, "fam_attention") == 2


def _sorted_rounds(b, h, n, L, chunk, seed=0):
    """Random buckets sorted by (bucket, position) as LshAttention sorts: (order, chunk_of)."""
    g = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, L // chunk, (b, h, n, L), generator=g)
    pos = torch.arange(L)
    order = torch.argsort(buckets * L + pos, -1)
    chunk_of = torch.empty_like(order).scatter_(-1, order, (pos // chunk).expand_as(order))
    return order.to(gc.DEVICE), chunk_of.to(gc.DEVICE)


LSH_CASES = [  # batch, heads, rounds, L, head_dim, chunk, alibi
    (1, 4, 2, 4096, 64, 64, True),
    (2, 2, 1, 4096, 128, 128, False),
    (1, 2, 4, 2048, 128, 64, False),
]


@pytest.mark.parametrize("b,h,n,L,d,chunk,alibi", LSH_CASES)
def test_lsh_chunk_attention(b, h, n, L, d, chunk, alibi):
    from megalong.kernels.lsh_attention import lsh_chunk_attention, reference_lsh_chunk_attention

    order, chunk_of = _sorted_rounds(b, h, n, L, chunk)
    (sq, sqr), (sk, skr), (sv, svr) = (pair(b, h, n, L, d, seed=s) for s in range(3))
    slopes = _slopes(h) if alibi else None
    with kernel_launches() as seen:
        got = lsh_chunk_attention(sq, sk, sv, order, chunk_of, chunk, d ** -0.5, slopes)
        want = reference_lsh_chunk_attention(sqr, skr, svr, order, chunk_of, chunk, d ** -0.5, slopes)
        compare(got, want, (sq, sk, sv), (sqr, skr, svr), REL, REL)  # (out, lse)
    assert launched_from(seen, "lsh_attention") == 2
    assert gc.rel(got[1], want[1]) < LSE_REL


@pytest.mark.parametrize("b,h,L,d,chunk", [(2, 4, 8192, 64, 64), (1, 4, 8192, 128, 128)])
def test_linear_attention(b, h, L, d, chunk):
    """The kernel on the float32 inputs LinearAttention.attend hands it (the module's own bf16
    path is in test_attention_modules)."""
    from megalong.kernels.linear_attention import linear_attention, reference_linear_attention

    pairs = _qkv(b, h, L, d)
    got_in = [x.detach().float().requires_grad_() for x, _ in pairs]
    want_in = [r for _, r in pairs]
    with kernel_launches() as seen:
        got = linear_attention(*got_in, 1e-6, chunk)
        want = reference_linear_attention(*want_in, 1e-6, chunk)
        compare([got], [want], got_in, want_in, REL, REL)
    assert launched_from(seen, "linear_attention") == 2


# ---- each attention kind's module end to end (its torch glue around the kernel) ------------------

def _module(kind: str, h: int, d: int):
    from megalong.attention.global_attention import GlobalAttention
    from megalong.attention.linear import LinearAttention
    from megalong.attention.local import LocalAttention
    from megalong.attention.lsh import LshAttention

    config = _config(h, d)
    return {
        "local": lambda: LocalAttention(config, 1, window=256, alibi=True),
        "local_dilated_global": lambda: LocalAttention(config, 1, window=128, dilation=[1, 2, 4, 8][:h],
                                                       global_tokens=[0, 1000, 2047], alibi=True),
        "global_alibi": lambda: GlobalAttention(config, 1, alibi=True),
        "linear": lambda: LinearAttention(config, 1, chunk_size=64),
        "lsh": lambda: LshAttention(config, 1, n_hashes=2, bucket_size=64, alibi=True),
    }[kind]()


MODULE_CASES = [  # kind, batch, heads, L, head_dim, kernel module that must run
    ("local", 1, 4, 8192, 64, "window_attention"),
    ("local", 2, 4, 4096, 128, "window_attention"),
    ("local_dilated_global", 1, 4, 4096, 64, "window_attention"),
    ("global_alibi", 1, 4, 4096, 128, "window_attention"),
    ("linear", 1, 4, 8192, 64, "linear_attention"),
    ("linear", 2, 4, 4096, 128, "linear_attention"),
    ("lsh", 1, 4, 8192, 64, "lsh_attention"),
    ("lsh", 1, 4, 4096, 128, "lsh_attention"),
]


@pytest.mark.parametrize("kind,b,h,L,d,kernel", MODULE_CASES)
def test_attention_modules(kind, b, h, L, d, kernel):
    module = _module(kind, h, d)
    heads = 2 * h if kind == "local_dilated_global" else h  # the global tokens' own projections
    pairs = _qkv(b, heads, L, d)
    got_in, want_in = [p[0] for p in pairs], [p[1] for p in pairs]
    if kind == "lsh":  # shared-QK: the module reads queries and values only
        got_in, want_in = got_in[::2], want_in[::2]
        got_args, want_args = (got_in[0], got_in[0], got_in[1]), (want_in[0], want_in[0], want_in[1])
    else:
        got_args, want_args = got_in, want_in
    with kernel_launches() as seen:
        got = module.attend(*got_args)
        with torch_path():
            want = module.attend(*want_args)
        tol = 2 * REL if kind == "lsh" else REL
        compare([got], [want], got_in, want_in, tol, tol)
    assert launched_from(seen, kernel) >= 2


@pytest.mark.parametrize("L,d,block_size,fam_length", [(8192, 64, 512, 64), (4096, 128, 512, 0)])
def test_fam_module_blocks(L, d, block_size, fam_length):
    h = 4
    module = _fam_module(h, d, block_size, 1, fam_length, True)
    pairs = _fam_inputs(1, h, L, d, block_size, fam_length)
    got_in, want_in = [p[0] for p in pairs], [p[1] for p in pairs]
    with kernel_launches() as seen:
        got = module.blocks(*got_in[:3], *(got_in[3:] or (None, None)))
        with torch_path():
            want = module.blocks(*want_in[:3], *(want_in[3:] or (None, None)))
        compare([got], [want], got_in, want_in, REL, REL)
    assert launched_from(seen, "fam_attention") == 2
