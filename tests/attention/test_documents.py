"""Packed documents (data.document_mask) in every kind that supports them, float64: the output on a
packed row [A; B; C] equals A, B and C run alone, forward and gradients, with ragged lengths (a
one-token document, documents longer than the window, boundaries inside a chunk); local's global
tokens against the explicit masked reference; linear's recurrent form restarted at document starts;
kinds without support refuse segments instead of ignoring them."""
from __future__ import annotations

import pytest
import torch

from attention.helpers import (
    alibi_reference_bias,
    assert_close_with_grads,
    attention_config,
    bhld,
    qkv,
    reference_sbh,
    sbh,
)
from megalong.attention.base import CoreAttention
from megalong.attention.options import ATTENTION_OPTIONS
from megalong.attention.registry import CORE_ATTENTION
from megalong.attention.segments import DocumentSegments, document_starts
from megalong.attention.reference import explicit_mask

TOL = 1e-9
# Document lengths per batch row (every row sums to L = 19): a one-token document at the start and
# in the middle, documents longer than the windows and chunks below, boundaries inside chunks.
ROWS = [[1, 9, 1, 8], [6, 13], [19]]
L = 19


def segment_ids(rows: list[list[int]] = ROWS) -> torch.Tensor:
    return torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in rows])


def packed_and_alone(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rows: list[list[int]] = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(the module on the packed batch with segment ids, every document of every row run alone
    and put back in place); both [L, b, heads * d]."""
    packed = module(q, k, v, packed_seq_params=DocumentSegments(segment_ids=segment_ids(rows)))
    columns = []
    for r, row in enumerate(rows):
        bounds = torch.tensor([0, *row]).cumsum(0).tolist()
        columns.append(torch.cat([module(q[s:e, r:r + 1], k[s:e, r:r + 1], v[s:e, r:r + 1])
                                  for s, e in zip(bounds[:-1], bounds[1:])], dim=0))
    return packed, torch.cat(columns, dim=1)


CASES = [  # kind, options, heads, alibi
    ("global", {}, 3, False),
    ("global", {}, 3, True),
    ("local", {"window": 4}, 3, False),
    ("local", {"window": 3, "dilation": [1, 2, 3]}, 3, True),
    ("local", {"window": 2, "dilation": 4}, 2, False),
    ("linear", {"normalization": "elu", "chunk_size": 4, "eps": 1e-3}, 2, False),
    ("linear", {"normalization": "elu", "chunk_size": 1, "eps": 1e-3}, 2, False),
    ("linear", {"normalization": "efficient", "chunk_size": 5}, 2, False),
    ("linear", {"normalization": "efficient", "chunk_size": 64}, 2, False),
]


# Kinds whose blocks, rows or buckets are cut from the packed row itself (so a document is not
# computed as if alone): tested against their own references with a document mask added.
OWN_TESTS = {"axial": "test_axial.py::test_axial_keeps_packed_documents_apart",
             "lsh": "test_lsh.py::test_lsh_masks_cross_document_pairs_in_every_round",
             "fam": "test_fam.py::test_fam_packed_documents_equal_per_block_loop"}


@pytest.mark.parametrize("kind,options,heads,alibi", CASES)
def test_packed_documents_equal_documents_alone(kind, options, heads, alibi):
    q, k, v = qkv(L, heads, batch=len(ROWS), seed=1)
    module = CORE_ATTENTION[kind](attention_config(heads), 1, alibi=alibi, **options)
    packed, alone = packed_and_alone(module, q, k, v)
    assert_close_with_grads(packed, alone, (q, k, v), TOL)
    # The documents do interact without the segments (so the equality above is not vacuous).
    assert (module(q, k, v) - alone).abs().max() > 1e-3


def test_every_kind_that_claims_documents_has_a_case():
    claimed = {kind for kind, options in ATTENTION_OPTIONS.items() if options.supports_document_mask}
    assert claimed == {kind for kind, *_ in CASES} | set(OWN_TESTS)
    for kind, core in CORE_ATTENTION.items():
        overridden = core.attend_documents is not CoreAttention.attend_documents
        assert overridden == (kind in claimed), kind


def test_a_kind_without_documents_refuses_segments(monkeypatch):
    """A core attention that does not define attend_documents raises on segment ids instead of
    ignoring them, and config validation refuses data.document_mask for its kind first."""
    from megalong.attention.options import GlobalOptions
    from megalong.config import ConfigError, config_from_dict, validate

    class Plain(CoreAttention):
        def attend(self, q, k, v):
            return q

    q, k, v = qkv(L, 2, batch=len(ROWS))
    with pytest.raises(NotImplementedError, match="data.document_mask"):
        Plain(attention_config(2), 1)(q, k, v, packed_seq_params=DocumentSegments(segment_ids=segment_ids()))
    monkeypatch.setattr(GlobalOptions, "supports_document_mask", False)
    cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "max_position_embeddings": 16, "attention_layers": ["global"]},
                            "data": {"document_mask": True}})
    with pytest.raises(ConfigError, match="data.document_mask: 'global' attention"):
        validate(cfg, check_paths=False)


@pytest.mark.parametrize("window,dilation,global_tokens,alibi", [
    (3, [1, 2], [0, 7, 12], False), (4, 1, 3, True), (2, [2, 1], [1, 2, 10, 11, 18], True)])
def test_local_global_tokens_stay_in_their_document(window, dilation, global_tokens, alibi):
    """A global token sees the earlier tokens of its own document and is seen by the later ones
    of its document only; explicit per-row masks, Longformer's two projections."""
    heads = 2
    from megalong.attention.local import LocalAttention

    module = LocalAttention(attention_config(heads), 1, window=window, dilation=dilation,
                            global_tokens=global_tokens, alibi=alibi)
    q, k, v = qkv(L, 2 * heads, batch=len(ROWS), seed=3)  # local heads, then global-projection heads
    out = module(q, k, v, packed_seq_params=DocumentSegments(segment_ids=segment_ids()))
    dilations = dilation if isinstance(dilation, list) else [dilation] * heads
    globals_ = set(range(global_tokens)) if isinstance(global_tokens, int) else set(global_tokens)
    bias = alibi_reference_bias(heads, L) if alibi else None
    seg = segment_ids()
    refs = []
    for r in range(len(ROWS)):
        s = seg[r].tolist()
        local = torch.stack([explicit_mask(L, lambda i, j, d=d: j <= i and s[i] == s[j] and (
            ((i - j) % d == 0 and (i - j) // d < window) or j in globals_)) for d in dilations])
        full = explicit_mask(L, lambda i, j: j <= i and s[i] == s[j])
        row = [x[:, r:r + 1] for x in (q, k, v)]
        ordinary = reference_sbh(*(x[:, :, :heads] for x in row), local, module.scale, bias)
        global_rows = reference_sbh(*(x[:, :, heads:] for x in row), full, module.scale, bias)
        is_global = torch.tensor([i in globals_ for i in range(L)]).view(L, 1, 1)
        refs.append(torch.where(is_global, global_rows, ordinary))
    assert_close_with_grads(out, torch.cat(refs, dim=1), (q, k, v), TOL)


@pytest.mark.parametrize("normalization", ["elu", "efficient"])
def test_linear_recurrent_form_restarts_at_document_starts(normalization):
    from megalong.attention.linear import LinearAttention
    from megalong.attention.linear_documents import restart_state

    heads = 2
    module = LinearAttention(attention_config(heads), 1, normalization=normalization, chunk_size=4, eps=1e-3)
    q, k, v = qkv(L, heads, batch=len(ROWS), seed=2)
    seg = segment_ids()
    packed = module(q, k, v, packed_seq_params=DocumentSegments(segment_ids=seg))
    qb, kb, vb = (bhld(x) for x in (q, k, v))
    initial = module.init_state(len(ROWS), heads, qb.shape[-1], qb.device, qb.dtype)
    state, starts, outs = initial, document_starts(seg), []
    for i in range(L):
        state = restart_state(state, initial, starts[:, i])
        out, state = module.step(qb[:, :, i:i + 1], kb[:, :, i:i + 1], vb[:, :, i:i + 1], state)
        outs.append(out)
    assert_close_with_grads(sbh(torch.cat(outs, dim=2)), packed, (q, k, v), TOL)


def test_segments_are_honoured_where_a_kernel_would_run(monkeypatch):
    """With the kernel selection forced on (kernels interpreted on the CPU), packed documents still
    equal the documents alone: global and local run the windowed kernel with the segment ids (it
    is called with them); linear, LSH and FAM run their own kernels with the segment ids
    (tests/test_kernels_documents.py)."""
    from megalong.kernels import select
    from megalong.kernels import window_attention as wa

    calls = []
    kernel = wa.window_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("segment_ids") is not None)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(wa, "window_attention", counted)
    for kind, options, heads, alibi in CASES:
        q, k, v = qkv(L, heads, batch=len(ROWS), seed=4)
        q32, k32, v32 = (x.detach().float() for x in (q, k, v))
        module = CORE_ATTENTION[kind](attention_config(heads), 1, alibi=alibi, **options)
        monkeypatch.setattr(select, "use_kernels", lambda *a, **k: True)
        calls.clear()
        packed = module(q32, k32, v32, packed_seq_params=DocumentSegments(segment_ids=segment_ids()))
        assert calls == ([True] * len(calls) if kind in ("global", "local") else []) and (
            kind not in ("global", "local") or calls), (kind, calls)
        monkeypatch.setattr(select, "use_kernels", lambda *a, **k: False)
        _, alone = packed_and_alone(module, q, k, v)
        assert (packed.double() - alone).abs().max() < 1e-5, kind

    # LSH's chunk kernel (bucket_size a power of two >= 16) would run on these if segments were ignored.
    from megalong.attention.lsh import LshAttention

    module = LshAttention(attention_config(2), 1, n_hashes=2, bucket_size=16, seed=3).double()
    q, v = (torch.randn(len(ROWS), 2, 32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i in (5, 6))
    seg = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [0] * 32, [0] * 16 + [1] * 16])
    monkeypatch.setattr(select, "use_kernels", lambda *a, **k: True)
    forced = module.attend_documents(q, q, v, seg)
    monkeypatch.setattr(select, "use_kernels", lambda *a, **k: False)
    # the kernel (with the segment ids) accumulates in float32: 1.1e-7 measured
    assert (forced - module.attend_documents(q, q, v, seg)).abs().max() < 1e-5
    assert (forced - module.attend(q, q, v)).abs().max() > 1e-3
