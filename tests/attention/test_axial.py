"""`axial`: against a per-token loop of its scheme, memory with a fixed number of columns; and the
axial position embeddings (model.position_embedding: axial), in float64."""
import pytest
import torch

from attention.helpers import (
    assert_close_with_grads,
    attention_config,
    bhld,
    forward_backward_memory,
    qkv,
    sbh,
)
from megalong.attention.alibi import alibi_slopes
from megalong.attention.axial import AxialAttention

TOL = 1e-9


def _axial_loop(q, k, v, cols, scale, slopes=None, doc=None):
    """The scheme of axial.py, token by token on [b, h, L, d]: row summaries u over whole rows,
    then one softmax over the row prefix (k, v) and the previous rows' same column (k, u). With
    `doc` (one document id per position, one batch row), every key set keeps its own document only."""
    b, h, L, d = q.shape
    doc = [0] * L if doc is None else doc
    sl = torch.zeros(h, dtype=q.dtype) if slopes is None else slopes.to(q.dtype)

    def dot(i, j):
        return (q[:, :, i] * k[:, :, j]).sum(-1) * scale  # [b, h]

    def summary(p):  # unmasked attention of p over its whole row (positions < L)
        start = p // cols * cols
        keys = [j for j in range(start, min(start + cols, L)) if doc[j] == doc[p]]
        w = torch.softmax(torch.stack([dot(p, j) - sl * abs(p - j) for j in keys], -1), -1)
        return sum(w[..., n, None] * v[:, :, j] for n, j in enumerate(keys))

    outs = []
    for p in range(L):
        r, c = divmod(p, cols)
        keys = [(j, v[:, :, j]) for j in range(r * cols, p + 1) if doc[j] == doc[p]]
        keys += [(rr * cols + c, summary(rr * cols + c)) for rr in range(r) if doc[rr * cols + c] == doc[p]]
        w = torch.softmax(torch.stack([dot(p, j) - sl * (p - j) for j, _ in keys], -1), -1)
        outs.append(sum(w[..., n, None] * val for n, (_, val) in enumerate(keys)))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("L,shape,alibi", [(12, [3, 4], False), (12, [4, 3], True), (10, [3, 4], True),
                                           (15, [3, 4], False), (6, [1, 6], False), (5, [5, 1], True)])
def test_axial_equals_per_token_loop(L, shape, alibi):
    heads = 4
    q, k, v = qkv(L, heads)
    module = AxialAttention(attention_config(heads), 1, axial_shape=shape, alibi=alibi)
    ref = sbh(_axial_loop(*(bhld(x) for x in (q, k, v)), shape[1], module.scale,
                          alibi_slopes(heads) if alibi else None))
    assert_close_with_grads(module(q, k, v), ref, (q, k, v), TOL)


def test_axial_memory_with_fixed_columns_grows_linearly():
    """With the number of columns fixed and rows few beside it, L * (rows + cols) is about L * cols:
    linear in L (cols = 128: 2 then 8 rows). (Square grids: tests/attention/test_contract.py.)"""
    def run(L):
        module = AxialAttention(attention_config(2), 1, axial_shape=[L // 128, 128])
        return forward_backward_memory(module, L)
    small, large = run(256), run(1024)
    assert large.peak <= 4.5 * small.peak, (small.peak, large.peak)


# ------------------------------------------------------------------------------------------------
# axial position embeddings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_axial_position_embedding_maps_position_to_row_and_column(mode):
    from megalong.model.axial_position import AxialPositionEmbedding

    emb = AxialPositionEmbedding([3, 5], hidden_size=6, mode=mode)
    positions = torch.arange(15).view(1, 15)
    out = emb(positions)
    assert out.shape == (1, 15, 6)
    for p in range(15):
        row, col = emb.row_embeddings[p // 5], emb.col_embeddings[p % 5]
        want = row + col if mode == "sum" else torch.cat([row, col])
        assert torch.equal(out[0, p], want)
    with pytest.raises(ValueError, match="do not fit"):
        emb(torch.arange(16).view(1, 16))


@pytest.mark.parametrize("L,shape,alibi", [(19, [4, 5], False), (19, [5, 4], True), (12, [3, 4], False)])
def test_axial_keeps_packed_documents_apart(L, shape, alibi):
    """Row summaries and column context never cross a document boundary: the per-token loop with
    every key set cut to the query's document; a one-token document, boundaries inside rows."""
    from megalong.attention.segments import DocumentSegments

    heads = 2
    lengths = [[1, L - 8, 7], [5, 1, L - 6]]
    segments = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    q, k, v = qkv(L, heads)
    module = AxialAttention(attention_config(heads), 1, axial_shape=shape, alibi=alibi)
    out = module(q, k, v, packed_seq_params=DocumentSegments(segment_ids=segments))
    b = [bhld(x) for x in (q, k, v)]
    ref = torch.cat([sbh(_axial_loop(*(x[r:r + 1] for x in b), shape[1], module.scale,
                                     alibi_slopes(heads) if alibi else None, segments[r].tolist()))
                     for r in range(2)], dim=1)
    assert_close_with_grads(out, ref, (q, k, v), TOL)
    assert (module(q, k, v) - ref).abs().max() > 1e-3
