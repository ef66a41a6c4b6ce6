"""The windowed kernel over packed documents (segment ids), under TRITON_INTERPRET=1 on the CPU:
against the explicit-mask reference with 'same document' added, for windows, dilation, global keys,
ALiBi, full causal rows and query positions; the tile walk starts at the earliest query's document
(tested by poisoning the keys of earlier documents with NaN, which a read tile would spread)."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import DEVICE, SMALL, assert_match, rand
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
