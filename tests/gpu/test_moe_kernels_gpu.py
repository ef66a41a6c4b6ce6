"""The MoE kernels at real sizes on CUDA against float32 torch references (skipped without CUDA).

Run on the lent GPU: `python -m pytest -q tests/gpu`. Gating, permutation/combination and the
grouped GEMM (forward and both gradients, both backends) are called through their public
functions; the references are megalong's torch path (`megalong/moe/*`, a loop over experts) on
float32 copies of the same values. A spy on Triton launches asserts what ran.

Thresholds (relative error, see gpu_compare.py): bf16 results < REL = 1e-2 (one GEMM or one
rounded sum); the experts' chain of three bf16 GEMMs and a bf16 activation < CHAIN_REL = 2e-2;
float32 gating results < F32_REL = 1e-5. Routing is compared tie-safely: the kernel's experts must
be ones the reference ranks best (their reference probabilities equal the top-k within 1e-6).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import gpu_compare as gc
from gpu_compare import compare, kernel_launches, launched_from, pair, rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU)")]

REL, CHAIN_REL, F32_REL, TIE = 1e-2, 2e-2, 1e-5, 1e-6


def _assert_best_experts(index: torch.Tensor, probs: torch.Tensor, k: int, bias=None) -> None:
    """Every chosen expert scores (reference probability + bias) among the top k, up to ties."""
    score = probs if bias is None else probs + bias
    best = score.topk(k, dim=-1).values
    chosen = score.gather(1, index).sort(dim=-1, descending=True).values
    assert (chosen - best).abs().max().item() < TIE


GATING_CASES = [  # tokens, experts, k, renormalize, selection bias, logits dtype
    (16384, 8, 2, True, False, torch.float32),
    (16384, 64, 2, True, False, torch.bfloat16),
    (16384, 64, 1, False, True, torch.float32),  # switch with aux-loss-free selection bias
]


@pytest.mark.parametrize("T,E,k,renormalize,bias,dtype", GATING_CASES)
def test_topk_gating(T, E, k, renormalize, bias, dtype):
    from megalong.kernels import moe
    from megalong.kernels.gating_reference import reference_topk_gating

    logits = (torch.randn(T, E, generator=torch.Generator().manual_seed(0)) * 2).to(gc.DEVICE, dtype)
    logits.requires_grad_()
    reference_logits = logits.detach().float().requires_grad_()
    selection_bias = 0.05 * torch.randn(E, generator=torch.Generator().manual_seed(1)).to(gc.DEVICE) if bias else None
    with kernel_launches() as seen:
        got = moe.topk_gating(logits, k, renormalize, selection_bias)
    assert launched_from(seen, "moe") == 1
    want = reference_topk_gating(reference_logits, k, renormalize, selection_bias)
    _assert_best_experts(got.expert_index, want.probs.detach(), k, selection_bias)
    assert torch.equal(got.counts, torch.bincount(got.expert_index.view(-1), minlength=E))
    # The gates of the kernel's choice, computed in torch: the reference for gates and gradients.
    top = want.probs.gather(1, got.expert_index)
    want_gates = top / top.sum(-1, keepdim=True) if renormalize else top
    compare([got.probs, got.gates], [want.probs, want_gates], (logits,), (reference_logits,),
            F32_REL, F32_REL if dtype == torch.float32 else REL)


def _routing(T: int, E: int, k: int, capacity: int, seed: int = 0):
    """A dispatch of T tokens to k distinct experts each, some assignments over capacity dropped."""
    from megalong.moe.dispatch import plan
    from megalong.moe.router import apply_capacity

    g = torch.Generator().manual_seed(seed)
    index = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    gates = torch.rand(T, k, generator=g)
    index, gates = index.to(gc.DEVICE), gates.to(gc.DEVICE)
    return plan(index, gates, apply_capacity(index, E, capacity), E)


@pytest.mark.parametrize("T,h,E,k", [(16384, 2048, 8, 2), (8192, 2560, 64, 2)])
def test_permute_and_combine(T, h, E, k):
    from megalong.kernels import moe
    from megalong.moe.dispatch import permute, unpermute

    d = _routing(T, E, k, capacity=int(T * k / E * 0.9))  # 10% under capacity: some tokens lose a row
    rows = moe.rows_of_tokens(d.token, T, k)
    (x, xr) = pair(T, h, seed=0)
    with kernel_launches() as seen:
        y = moe.permute_rows(x, d.token, rows)
        assert torch.equal(y.float(), permute(xr, d))  # a gather: exact
        compare([y], [permute(xr, d)], (x,), (xr,), REL, REL)
    assert launched_from(seen, "moe") == 2  # gather, and its backward (combine without gates)
    (e, er) = pair(len(d.token), h, seed=1)
    gate = d.gate.float().requires_grad_()
    gate_r = d.gate.float().requires_grad_()
    with kernel_launches() as seen:
        out = moe.combine_rows(e, gate, d.token, rows)
        compare([out], [unpermute(er, replace(d, gate=gate_r), T)], (e, gate), (er, gate_r), REL, REL)
    assert launched_from(seen, "moe") == 3  # combine; backward: gathers for dy and for dgate


def _counts(N: int, E: int, seed: int = 0) -> torch.Tensor:
    """Uneven rows per expert summing to N, expert 1 without any."""
    g = torch.Generator().manual_seed(seed)
    share = torch.rand(E, generator=g) + 0.2
    share[1] = 0
    counts = (share / share.sum() * N).long()
    counts[0] += N - counts.sum()
    return counts.to(gc.DEVICE)


GEMM_CASES = [  # rows, n, m, experts (real expert shapes: hidden -> 4 x hidden and back)
    (16384, 2048, 8192, 8),
    (16384, 3072, 768, 64),
    (8192, 2560, 10240, 8),
]


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("N,n,m,E", GEMM_CASES)
def test_grouped_mm(N, n, m, E, backend):
    from megalong.kernels import grouped_gemm as gg

    counts = _counts(N, E)
    (x, xr), (w, wr) = pair(N, n, seed=0), pair(E, n, m, scale=n ** -0.5, seed=1)
    expected = "triton" if backend == "triton" else gg.grouped_mm_backend(
        torch.bfloat16, n, m, gg.device_arch(x.device))
    with kernel_launches() as seen:
        got = gg.grouped_mm(x, w, counts, backend)
        compare([got], [gg.reference_grouped_mm(xr, wr, counts)], (x, w), (xr, wr), REL, REL)
    assert launched_from(seen, "grouped_gemm") == (3 if expected == "triton" else 0)  # fwd, dx, dw


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("N,n,m,E", GEMM_CASES[:1])
def test_grouped_mm_under_autocast(N, n, m, E, backend):
    """float32 rows and master weights under autocast: the GEMM runs in bf16 (on sm_90 with
    `auto`: torch._grouped_mm), the output is bf16, the gradients arrive in float32."""
    from megalong.kernels import grouped_gemm as gg

    counts = _counts(N, E)
    x = torch.randn(N, n, generator=torch.Generator().manual_seed(0)).to(gc.DEVICE).requires_grad_()
    w = (torch.randn(E, n, m, generator=torch.Generator().manual_seed(1)) * n ** -0.5).to(gc.DEVICE)
    w.requires_grad_()
    with torch.autocast(gc.DEVICE, dtype=torch.bfloat16):
        assert gg.gemm_dtype(x, w) == torch.bfloat16
        expected = "triton" if backend == "triton" else gg.grouped_mm_backend(
            torch.bfloat16, n, m, gg.device_arch(x.device))
        with kernel_launches() as seen:
            got = gg.grouped_mm(x, w, counts, backend)
    assert got.dtype == torch.bfloat16
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(2)).to(gc.DEVICE)
    with kernel_launches() as seen_backward:
        dx, dw = torch.autograd.grad((got.float() * weight).sum(), (x, w))
    assert dx.dtype == dw.dtype == torch.float32
    launches = launched_from(seen, "grouped_gemm") + launched_from(seen_backward, "grouped_gemm")
    assert launches == (3 if expected == "triton" else 0)
    want = gg.reference_grouped_mm(x, w, counts)
    want_dx, want_dw = torch.autograd.grad((want * weight).sum(), (x, w))
    errors = [rel(got, want), rel(dx, want_dx), rel(dw, want_dw)]
    assert max(errors) < REL, errors


@pytest.mark.parametrize("T,h,E", [(8192, 2048, 8), (8192, 768, 64)])
def test_moe_experts_under_autocast(T, h, E):
    """fused_experts (permute, grouped GEMMs, combine) under bf16 autocast against the torch
    path in float32, the same float32 master weights and rows."""
    from megalong.moe.dispatch import permute, unpermute
    from megalong.moe.experts import Experts
    from megalong.moe.layer import fused_experts

    k = 2
    torch.manual_seed(0)
    experts = Experts(E, h, 4 * h, F.gelu, gated=True, init_std=0.02, output_std=0.02).to(gc.DEVICE)
    d = _routing(T, E, k, capacity=T * k)
    x = torch.randn(T, h, generator=torch.Generator().manual_seed(3)).to(gc.DEVICE).requires_grad_()
    params = (x, experts.w1, experts.w2, experts.w3)
    with kernel_launches() as seen, torch.autocast(gc.DEVICE, dtype=torch.bfloat16):
        got = fused_experts(experts, x, d, k)
    assert got.dtype == torch.bfloat16 and launched_from(seen, "moe") == 2  # permute, combine
    want = unpermute(experts(permute(x, d), d.tokens_per_expert), d, T)
    compare([got], [want], params, params, CHAIN_REL, CHAIN_REL)


@pytest.mark.parametrize("T,h", [(16384, 2048)])
@pytest.mark.parametrize("options", [dict(num_experts=64, top_k=2), dict(num_experts=8, top_k=1, router="switch",
                                                                          z_loss_coeff=1e-3)])
def test_topk_route(T, h, options):
    """The router on the gating kernel against TopKRouter's torch path (float32)."""
    from megalong.moe.options import MoEOptions
    from megalong.moe.router import TopKRouter

    torch.manual_seed(0)
    o = MoEOptions(**options)
    router = TopKRouter(h, o).to(gc.DEVICE)
    x = torch.randn(T, h, generator=torch.Generator().manual_seed(1)).to(gc.DEVICE)
    with kernel_launches() as seen:
        got = router(x, fused=True)
    assert launched_from(seen, "moe") == 1
    want = router(x)
    probs = torch.softmax(F.linear(x, router.weight), dim=-1)
    _assert_best_experts(got.expert_index, probs.detach(), router.top_k)
    assert torch.equal(got.load, torch.bincount(got.expert_index.view(-1), minlength=o.num_experts))
    assert rel(got.aux_loss, want.aux_loss) < 1e-4
