"""The kernels at real sizes in bf16 on CUDA against float32 torch references (skipped without CUDA).

Run on the lent GPU: `python -m pytest -q tests/gpu -m gpu`. Criterion (issue 8): relative error
||kernel - reference|| / ||reference|| below 1e-2 for outputs and gradients.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]

REL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _check(outputs, references, inputs, ref_inputs):
    weights = [torch.randn_like(r, dtype=torch.float32) for r in references]
    for o, r in zip(outputs, references):
        assert _rel(o, r) < REL
    got = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(outputs, weights)), inputs)
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(references, weights)), ref_inputs)
    for a, b in zip(got, want):
        assert _rel(a, b) < REL


def _pair(*shape):
    """The same values as a bf16 kernel input and a float32 reference input."""
    x = torch.randn(*shape, device="cuda").bfloat16()
    reference = x.float().requires_grad_()
    return x.requires_grad_(), reference


@pytest.mark.parametrize("L,window,dilation,alibi,n_global", [(4096, 256, 1, True, 0), (4096, 1024, 1, False, 0),
                                                               (4096, 128, 2, True, 16), (2048, None, 1, True, 0)])
def test_window_attention_bf16(L, window, dilation, alibi, n_global):
    from megalong.kernels.window_attention import reference_window_attention, window_attention

    (q, qr), (k, kr), (v, vr) = _pair(1, 12, L, 64), _pair(1, 12, L, 64), _pair(1, 12, L, 64)
    slopes = torch.rand(12, device="cuda") * 0.1 if alibi else None
    keys = torch.arange(0, L, L // n_global, device="cuda") if n_global else None
    got = window_attention(q, k, v, 0.125, window, dilation, slopes, keys)
    want = reference_window_attention(qr, kr, vr, 0.125, window, dilation, slopes, keys)
    _check(got, want, (q, k, v), (qr, kr, vr))


def test_linear_attention_bf16():
    from megalong.kernels.linear_attention import linear_attention, reference_linear_attention

    (q, qr), (k, kr), (v, vr) = _pair(2, 12, 4096, 64), _pair(2, 12, 4096, 64), _pair(2, 12, 4096, 64)
    _check([linear_attention(q, k, v)], [reference_linear_attention(qr, kr, vr)], (q, k, v), (qr, kr, vr))


def test_lsh_attend_bf16():
    from types import SimpleNamespace

    from megalong.attention.lsh import LshAttention
    from megalong.kernels import select

    config = SimpleNamespace(num_attention_heads=12, kv_channels=64, hidden_size=768, attention_dropout=0.0)
    module = LshAttention(config, 1, n_hashes=2, bucket_size=64)
    (q, qr), (v, vr) = _pair(1, 12, 4096, 64), _pair(1, 12, 4096, 64)
    _check([select.lsh_attend(module, q, q, v)], [module.attend(qr, qr, vr)], (q, v), (qr, vr))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_moe_bf16(backend):
    from megalong.kernels import moe

    T, E, k, h, f = 8192, 8, 2, 768, 2048
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    g = moe.topk_gating(logits, k, True)
    r = moe.reference_topk_gating(logits, k, True)
    assert torch.equal(g.expert_index, r.expert_index) and torch.equal(g.counts, r.counts)
    counts = g.counts.clone()
    counts[0] += counts[1]
    counts[1] = 0  # an expert without tokens
    (x, xr), (w, wr) = _pair(int(counts.sum()), h), _pair(E, h, f)
    _check([moe.grouped_mm(x, w, counts, backend)], [moe.reference_grouped_mm(xr, wr, counts)], (x, w), (xr, wr))
