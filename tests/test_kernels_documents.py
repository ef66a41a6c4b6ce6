"""The kernels over packed documents (segment ids), under TRITON_INTERPRET=1 on the CPU.

Windowed: against the explicit-mask reference with 'same document' added, for windows, dilation,
global keys, ALiBi, full causal rows and query positions; the tile walk starts at the earliest
query's document (tested by poisoning the keys of earlier documents with NaN, which a read tile
would spread). Linear, LSH and FAM: against their torch paths over documents in float64 (ragged
rows: a one-token document, documents longer than a chunk / bucket / block, boundaries inside
them), each also shown to differ without the segment ids; and their grouped key/value heads
against the same kernel with the groups repeated per query head."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from kernel_helpers import DEVICE, SMALL, assert_match, attn_config, rand, sorted_rounds
from megalong.kernels import fam_attention as fa
from megalong.kernels import linear_attention as la
from megalong.kernels import lsh_attention as lsh
from megalong.kernels import select
from megalong.kernels import window_attention as wa


def _segments(b: int, rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in rows[:b]], device=DEVICE)


ROWS = [[1, 20, 3, 16], [40], [17, 1, 22]]
CASES = [  # h, D, window, dilation, alibi, global keys
    (2, 16, None, 1, False, None),  # global attention over documents
    (2, 16, None, 1, True, None),
    (1, 32, 6, 1, False, None),
    (2, 16, 5, 3, True, None),
    (2, 16, 4, 2, False, [0, 9, 21, 33]),
]


@pytest.mark.parametrize("h,D,window,dilation,alibi,global_keys", CASES)
def test_window_kernel_keeps_documents_apart(h, D, window, dilation, alibi, global_keys):
    b, L = 3, 40
    q, k, v = rand(b, h, L, D, seed=0), rand(b, h, L, D, seed=1), rand(b, h, L, D, seed=2)
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(3)).to(DEVICE) if alibi else None
    keys = None if global_keys is None else torch.tensor(global_keys, device=DEVICE)
    seg = _segments(b, ROWS)
    got = wa.window_attention(q, k, v, 0.3, window, dilation, slopes, keys, blocks=SMALL, segment_ids=seg)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, window, dilation,
                                         None if slopes is None else slopes.double(), keys, segment_ids=seg)
    assert_match(got, want, (q, k, v))
    plain = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, window, dilation,
                                          None if slopes is None else slopes.double(), keys)
    assert (plain[0] - want[0]).abs().max() > 1e-3  # the documents meet without the segment ids


def test_window_kernel_query_positions_with_documents():
    L = 40
    q, k, v = rand(2, 2, 4, 16, seed=0), rand(2, 2, L, 16, seed=1), rand(2, 2, L, 16, seed=2)
    pos = torch.tensor([0, 7, 20, 39], device=DEVICE)
    seg = _segments(2, ROWS)
    got = wa.window_attention(q, k, v, 0.3, None, 1, None, None, pos, blocks=SMALL, segment_ids=seg)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, None, 1, None, None, pos,
                                         segment_ids=seg)
    assert_match(got, want, (q, k, v))


def test_window_kernel_never_reads_key_tiles_of_earlier_documents():
    """Keys and values of the first 32 positions are NaN: the queries of the document starting at
    32 are finite only if no tile before it was loaded (a masked NaN still poisons the sums)."""
    L = 48
    q, k, v = (rand(1, 1, L, 16, seed=i).detach() for i in range(3))
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    seg = torch.tensor([[0] * 32 + [1] * 16], device=DEVICE)
    out, _ = wa.window_attention(q, k, v, 0.3, None, 1, None, None, blocks=SMALL, segment_ids=seg)
    assert torch.isfinite(out[:, :, 32:]).all()
    want, _ = wa.reference_window_attention(q[:, :, 32:].double(), k[:, :, 32:].double(),
                                            v[:, :, 32:].double(), 0.3)
    assert (out[:, :, 32:].double() - want).abs().max() < 1e-5


def _repeat(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


# ---- linear attention --------------------------------------------------------------------------

LINEAR_ROWS = [[1, 20, 3, 16], [40], [17, 1, 22]]  # with 16-token chunks: a one-token document,
# documents longer than a chunk, boundaries inside chunks, a row of one document


@pytest.mark.parametrize("L,chunk,rows", [(40, 16, LINEAR_ROWS), (37, 16, [[16, 16, 5], [3, 34], [1, 1, 35]])])
def test_linear_kernel_restarts_at_documents(L, chunk, rows):
    """Rows of the second case start documents exactly at chunk boundaries (16, 32), and two
    one-token documents in a row."""
    from megalong.attention.linear_documents import segmented_linear_attention
    from megalong.kernels.linear_reference import elu_feature_map

    b, h = 3, 2
    q, k, v = rand(b, h, L, 16, seed=0), rand(b, h, L, 16, seed=1), rand(b, h, L, 24, seed=2)
    seg = _segments(b, rows)
    got = la.linear_attention(q, k, v, 1e-6, chunk, segment_ids=seg)
    fq, fk = elu_feature_map(q.double()), elu_feature_map(k.double())
    want = segmented_linear_attention(fq, fk, v.double(), seg.view(b, L), 1e-6, chunk)
    assert_match([got], [want], (q, k, v))
    plain = la.reference_linear_attention(q.double(), k.double(), v.double(), 1e-6, chunk)
    assert (plain[0] - want[0]).abs().max() > 1e-3


@pytest.mark.parametrize("segments", [False, True])
def test_linear_kernel_grouped_heads_equal_repeated(segments):
    """4 query heads over 2 key/value groups (query head i reads group i // 2), no copies: equals
    the kernel on the groups repeated per query head, gradients summed over each group."""
    b, h, g, L = 3, 4, 2, 40
    q, k, v = rand(b, h, L, 16, seed=0), rand(b, g, L, 16, seed=1), rand(b, g, L, 16, seed=2)
    seg = _segments(b, LINEAR_ROWS) if segments else None
    got = la.linear_attention(q, k, v, 1e-6, 16, segment_ids=seg)
    want = la.linear_attention(q, _repeat(k, h), _repeat(v, h), 1e-6, 16, segment_ids=seg)
    assert_match([got], [want], (q, k, v))


def test_linear_attend_documents_takes_the_kernel_with_groups(monkeypatch):
    import megalong.attention.linear as linear
    from megalong.attention.linear import LinearAttention
    from test_kernels import on_kernels_and_torch

    monkeypatch.setattr(linear, "linear_kernel_covers", lambda *a: True)  # float32 on the kernel here
    module = LinearAttention(attn_config(4), 1, chunk_size=16)
    q, k, v = rand(3, 4, 40, 16, seed=0), rand(3, 2, 40, 16, seed=1), rand(3, 2, 40, 16, seed=2)
    seg = _segments(3, LINEAR_ROWS)
    got, want = on_kernels_and_torch(lambda: [module.attend_documents(q, k, v, seg), module.attend(q, k, v)])
    assert_match(got, want, (q, k, v))


# ---- LSH chunk attention -----------------------------------------------------------------------

def _lsh_rounds(b, h, n, L, c, seed=0):
    return sorted_rounds(b, h, n, L, c, seed, n_buckets=3)


@pytest.mark.parametrize("n,alibi", [(1, False), (2, True)])
def test_lsh_kernel_keeps_documents_apart(n, alibi):
    """Against the explicit reference with documents and the module's torch chunk attention
    (what the kernel replaces): padding (-1) sorts last, documents mix inside every chunk."""
    from megalong.attention.lsh import LshAttention

    b, h, L, c = 3, 2, 40, 16
    order, chunk_of, Lp = _lsh_rounds(b, h, n, L, c)
    seg = F.pad(_segments(b, LINEAR_ROWS), (0, Lp - L), value=-1)
    sq, sk, sv = (rand(b, h, n, Lp, 16, seed=s) for s in range(3))
    module = LshAttention(attn_config(h), 1, n_hashes=n, bucket_size=c, alibi=alibi)
    slopes = module.alibi_slopes(sq.device, torch.float32) if alibi else None
    got = lsh.lsh_chunk_attention(sq, sk, sv, order, chunk_of, c, module.scale, slopes, segment_ids=seg)
    inputs = [x.double() for x in (sq, sk, sv)]
    want = lsh.reference_lsh_chunk_attention(*inputs, order, chunk_of, c, module.scale,
                                             None if slopes is None else slopes.double(), segment_ids=seg)
    assert_match(got, want, (sq, sk, sv))
    torch_path = module.chunk_attention(*inputs, order, chunk_of, seg)
    assert max((a - w).abs().max().item() for a, w in zip(torch_path, want)) < 1e-10
    plain = lsh.reference_lsh_chunk_attention(*inputs, order, chunk_of, c, module.scale,
                                              None if slopes is None else slopes.double())
    assert (plain[0][:, :, :, :L] - want[0][:, :, :, :L]).abs().max() > 1e-3


def test_lsh_attend_documents_takes_the_kernel():
    from megalong.attention.lsh import LshAttention
    from test_kernels import on_kernels_and_torch

    module = LshAttention(attn_config(2), 1, n_hashes=2, bucket_size=16, alibi=True)
    q, v = rand(3, 2, 40, 16, seed=0), rand(3, 2, 40, 16, seed=2)
    seg = _segments(3, LINEAR_ROWS)
    assert_match(*on_kernels_and_torch(lambda: [module.attend_documents(q, q, v, seg)]), (q, v))


# ---- FAM block attention -----------------------------------------------------------------------

def _fam_documents(seg, L, B):
    """fam_docs as `fam_block_context` derives them: F_{t-1} belongs to the document of block
    t - 1's last token (block 0: the first document)."""
    n = -(-L // B)
    ends = (torch.arange(1, n + 1, device=seg.device) * B).clamp(max=L) - 1
    return torch.cat([seg[:, :1], seg[:, ends][:, :-1]], dim=1)


FAM_DOC_CASES = [  # heads, groups, L, block_size, memory, fam_length, alibi, rows
    (2, 2, 40, 8, 1, 3, True, LINEAR_ROWS),  # blocks smaller than the 16-row tiles
    (2, 2, 40, 24, 0, 20, False, LINEAR_ROWS),  # two query tiles per block, two FAM key tiles
    (2, 2, 37, 16, 2, 0, True, [[16, 16, 5], [3, 34], [1, 1, 35]]),  # no FAM, two memory blocks
    (4, 2, 40, 8, 2, 3, True, LINEAR_ROWS),  # grouped key/value heads
]


@pytest.mark.parametrize("h,g,L,B,memory,fam_length,alibi,rows", FAM_DOC_CASES)
def test_fam_kernel_keeps_documents_apart(h, g, L, B, memory, fam_length, alibi, rows):
    """Against `FamAttention.blocks` with `FamDocuments` on the torch path (float64): memory and
    own-block keys of the query's document, F_{t-1} for its document's queries, the initial FAM
    for documents started in the block. With groups, the torch path gets them repeated."""
    from megalong.attention.fam import FamAttention, FamDocuments

    b, D = 3, 16
    module = FamAttention(attn_config(h, D), 1, block_size=B, memory_segments=memory, fam_length=fam_length,
                          alibi=alibi)
    n = -(-L // B)
    q, k, v = rand(b, h, L, D, seed=0), rand(b, g, L, D, seed=1), rand(b, g, L, D, seed=2)
    kf, vf, ki, vi = (rand(*size, seed=s) if fam_length else None
                      for size, s in (((b, g, n, fam_length, D), 3), ((b, g, n, fam_length, D), 4),
                                      ((b, g, fam_length, D), 5), ((b, g, fam_length, D), 6)))
    seg = _segments(b, rows)
    fam_docs = _fam_documents(seg, L, B)
    slopes = module.alibi_slopes(q.device, torch.float32) if alibi else None
    got = fa.fam_block_attention(q, k, v, kf, vf, module.scale, B, memory, slopes, blocks=SMALL,
                                 segment_ids=seg, fam_docs=fam_docs, k_init=ki, v_init=vi)
    kf64, vf64, ki64, vi64 = (None if x is None else _repeat(x.double(), h) for x in (kf, vf, ki, vi))
    select.set_mode("reference")
    try:
        want = module.blocks(q.double(), _repeat(k.double(), h), _repeat(v.double(), h), kf64, vf64,
                             FamDocuments(seg, fam_docs, ki64, vi64))
        plain = module.blocks(q.double(), _repeat(k.double(), h), _repeat(v.double(), h), kf64, vf64)
    finally:
        select.set_mode("auto")
    inputs = (q, k, v) + ((kf, vf, ki, vi) if fam_length else ())
    assert_match([got], [want], inputs)
    assert (plain - want).abs().max() > 1e-3


def test_fam_kernel_grouped_heads_equal_repeated():
    """Without documents: 4 query heads over 2 groups equal the kernel on repeated groups."""
    b, h, g, L, B, fl, D = 1, 4, 2, 37, 8, 3, 16
    n = -(-L // B)
    q, k, v = rand(b, h, L, D, seed=0), rand(b, g, L, D, seed=1), rand(b, g, L, D, seed=2)
    kf, vf = rand(b, g, n, fl, D, seed=3), rand(b, g, n, fl, D, seed=4)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    got = fa.fam_block_attention(q, k, v, kf, vf, 0.25, B, 1, slopes, blocks=SMALL)
    want = fa.fam_block_attention(q, *(_repeat(x, h) for x in (k, v, kf, vf)), 0.25, B, 1, slopes, blocks=SMALL)
    assert_match([got], [want], (q, k, v, kf, vf))


def test_fam_kernel_never_reads_key_tiles_of_earlier_documents():
    """Keys and values of the first 32 positions are NaN, the document starting at 32 runs to 48
    with 16-token blocks and two memory blocks: its queries are finite only if no key tile of the
    earlier document was loaded (its memory blocks lie there)."""
    L, B = 48, 16
    q, k, v = (rand(1, 1, L, 16, seed=i).detach() for i in range(3))
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    seg = torch.tensor([[0] * 32 + [1] * 16], device=DEVICE)
    out = fa.fam_block_attention(q, k, v, None, None, 0.3, B, 2, blocks=SMALL, segment_ids=seg,
                                 fam_docs=_fam_documents(seg, L, B))
    assert torch.isfinite(out[:, :, 32:]).all()
    want, _ = wa.reference_window_attention(q[:, :, 32:].double(), k[:, :, 32:].double(),
                                            v[:, :, 32:].double(), 0.3)
    assert (out[:, :, 32:].double() - want).abs().max() < 1e-5
