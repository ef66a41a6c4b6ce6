"""The MoE kernels (top-k gating, token permutation and combination, grouped GEMM) against their
torch references under Triton's CPU interpreter, as tests/test_kernels.py (tolerances there)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import DEVICE, OUT_TOL, addresses, assert_match, rand
from kernel_helpers import far_memory  # noqa: F401  (a fixture)
from megalong.kernels import grouped_gemm as gg
from megalong.kernels import moe
from megalong.kernels.gating_reference import reference_topk_gating
from megalong.moe.layer import fused_experts


# ---- MoE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k,renormalize,bias,force", [
    (37, 8, 2, True, False, None),
    (5, 4, 1, False, True, None),  # switch-like, selection bias; some experts get no token
    (20, 6, 2, True, False, 2),  # every token's first choice is expert 2
    (1, 3, 3, True, False, None),  # one token, k = E
])
def test_topk_gating_matches_reference(T, E, k, renormalize, bias, force):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    if force is not None:
        logits[:, force] += 20
    logits = logits.to(DEVICE).requires_grad_()
    selection_bias = (0.1 * torch.randn(E, generator=torch.Generator().manual_seed(1))).to(DEVICE) if bias else None
    got = moe.topk_gating(logits, k, renormalize, selection_bias)
    want = reference_topk_gating(logits.double(), k, renormalize, selection_bias)
    assert torch.equal(got.expert_index, want.expert_index)
    assert torch.equal(got.counts, want.counts)
    if force is not None:
        assert got.counts[force].item() == T
    assert_match([got.probs, got.gates], [want.probs, want.gates], (logits,))


@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [11, 0, 0, 0], [20, 0, 37, 5]])  # idle expert; all on one
def test_grouped_mm_matches_loop(counts):
    tokens = torch.tensor(counts, device=DEVICE)
    x, w = rand(sum(counts), 24, seed=0), rand(4, 24, 40, seed=1)
    assert_match([gg.grouped_mm(x, w, tokens)], [gg.reference_grouped_mm(x.double(), w.double(), tokens)],
                  (x, w))


def _moe_options(**kw):
    from megalong.moe.options import MoEOptions

    return MoEOptions(**kw)


@pytest.mark.parametrize("options", [dict(num_experts=4, top_k=2, capacity_factor=1.0),
                                     dict(num_experts=4, top_k=1, router="switch", z_loss_coeff=0.1,
                                          bias_update_rate=0.01)])
def test_moe_route_and_experts_equal_torch_path(options):
    from megalong.moe.dispatch import permute, plan, unpermute
    from megalong.moe.experts import Experts
    from megalong.moe.router import TopKRouter

    torch.manual_seed(0)
    o = _moe_options(**options)
    router = TopKRouter(24, o).to(DEVICE)
    experts = Experts(4, 24, 32, F.gelu, gated=True, init_std=0.2, output_std=0.2).to(DEVICE)
    x = rand(23, 24, seed=3)
    got, want = router(x, fused=True), router(x)
    assert torch.equal(got.expert_index, want.expert_index) and torch.equal(got.kept, want.kept)
    assert torch.equal(got.load, want.load)
    d_got = plan(got.expert_index, got.gates, got.kept, 4)
    d_want = plan(want.expert_index, want.gates, want.kept, 4)
    out = fused_experts(experts, x, d_got, router.top_k)
    ref = unpermute(experts(permute(x, d_want), d_want.tokens_per_expert), d_want, x.shape[0])
    params = (x, router.weight, experts.w1, experts.w2, experts.w3)
    assert_match([out, got.aux_loss], [ref, want.aux_loss], params)


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch of the test: (kernel name, {argument: dtype} of its tensor arguments)."""
    from triton.runtime.jit import KernelInterface

    seen = []
    launch = KernelInterface.__getitem__

    def recording(kernel, grid):
        run = launch(kernel, grid)

        def record(*args, **kwargs):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            seen.append((kernel.fn.__name__, {k: v.dtype for k, v in named.items() if torch.is_tensor(v)}))
            return run(*args, **kwargs)
        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", recording)
    return seen


BF16_REL = 1e-2  # ||got - want|| / ||want|| for bf16 GEMMs (one bf16 rounding is 2^-9 relative)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_grouped_mm_follows_autocast(launches):
    """Under autocast the fp32 rows and master weights reach the kernels as bf16 (as a torch
    matmul's operands would), the output is bf16, and the gradients arrive in float32."""
    counts = torch.tensor([20, 0, 37, 5], device=DEVICE)
    x, w = rand(62, 40, seed=0), rand(4, 40, 56, seed=1)
    assert gg.gemm_dtype(x, w) == torch.float32
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert gg.gemm_dtype(x, w) == torch.bfloat16
        y = gg.grouped_mm(x, w, counts)
        torch_path = gg.reference_grouped_mm(x, w, counts)
    assert y.dtype == torch_path.dtype == torch.bfloat16
    gemms = [dtypes for name, dtypes in launches if name == "_grouped_mm_kernel"]
    assert len(gemms) == 1 and gemms[0]["X"] == gemms[0]["W"] == torch.bfloat16
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dx, dw = torch.autograd.grad((y.float() * weight).sum(), (x, w))
    assert dx.dtype == dw.dtype == torch.float32
    backward = [(name, dtypes) for name, dtypes in launches[1:]]
    assert {name for name, _ in backward} == {"_grouped_mm_kernel", "_grouped_wgrad_kernel"}
    assert all(d["X"] == torch.bfloat16 for _, d in backward)
    assert [d["DW"] for name, d in backward if name == "_grouped_wgrad_kernel"] == [torch.float32]
    want = gg.reference_grouped_mm(x.double(), w.double(), counts)
    want_dx, want_dw = torch.autograd.grad((want * weight.double()).sum(), (x, w))
    assert _rel(y, want) < BF16_REL and _rel(y, torch_path) < BF16_REL
    assert _rel(dx, want_dx) < BF16_REL and _rel(dw, want_dw) < BF16_REL


def test_moe_experts_under_autocast_equal_torch_path(launches):
    """The fused experts (permute, grouped GEMMs, combine) and the torch path, both under
    autocast, agree within bf16 tolerance; float32 master weights get float32 gradients."""
    from megalong.moe.dispatch import permute, plan, unpermute
    from megalong.moe.experts import Experts

    torch.manual_seed(0)
    experts = Experts(4, 24, 32, F.gelu, gated=True, init_std=0.2, output_std=0.2).to(DEVICE)
    x = rand(23, 24, seed=3)
    index = torch.randint(0, 4, (23, 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    index[:, 1] = (index[:, 0] + 1) % 4
    gates = torch.rand(23, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    d = plan(index, gates, torch.ones_like(index, dtype=torch.bool), 4)
    params = (x, experts.w1, experts.w2, experts.w3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = fused_experts(experts, x, d, 2)
        want = unpermute(experts(permute(x, d), d.tokens_per_expert), d, x.shape[0])
    assert got.dtype == want.dtype == torch.bfloat16
    gemm_operands = [d_[k] for name, d_ in launches if name == "_grouped_mm_kernel" for k in ("X", "W")]
    assert len(gemm_operands) == 6 and set(gemm_operands) == {torch.bfloat16}
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    got_grads = torch.autograd.grad((got.float() * weight).sum(), params)
    want_grads = torch.autograd.grad((want.float() * weight).sum(), params)
    assert _rel(got, want) < BF16_REL
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32 and _rel(a, b) < BF16_REL


def test_topk_route_under_autocast_stays_in_router_dtype():
    """Under bf16 autocast the kernel router, like TopKRouter, computes float32 logits: its
    routing equals the torch router's under autocast and without it."""
    from megalong.moe.router import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(24, _moe_options(num_experts=4, top_k=2, z_loss_coeff=0.1)).to(DEVICE)
    x = rand(23, 24, seed=3)
    plain = router(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = router(x, fused=True), router(x)
    for routing in (want, plain):
        assert torch.equal(got.expert_index, routing.expert_index)
        assert (got.gates - routing.gates).abs().max().item() < OUT_TOL
        assert abs(got.aux_loss.item() - routing.aux_loss.item()) < OUT_TOL


def test_grouped_mm_backend_and_dtype_choices():
    big = dict(n=768, m=3072)
    assert gg.grouped_mm_backend(torch.bfloat16, arch=90, **big) == "torch_grouped_mm"
    assert gg.grouped_mm_backend(torch.bfloat16, arch=90, has_torch_grouped_mm=False, **big) == "triton"
    assert gg.grouped_mm_backend(torch.float32, arch=90, **big) == "triton"
    assert gg.grouped_mm_backend(torch.bfloat16, arch=80, **big) == "triton"
    assert gg.grouped_mm_backend(torch.bfloat16, 768, 3070, arch=90) == "triton"  # m % 8
    assert gg.grouped_mm_backend(torch.bfloat16, arch=0, **big) == "triton"  # off CUDA
    assert gg.dot_input_precision(torch.float32, "highest") == "tf32x3"
    assert gg.dot_input_precision(torch.float32, "high") == "tf32"
    assert gg.dot_input_precision(torch.bfloat16, "highest") == "ieee"
    with pytest.raises(ValueError, match="grouped_mm"):
        gg.gemm_dtype(torch.zeros(2, 3), torch.zeros(1, 3, 4, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never cast, like torch's matmul
        assert gg.gemm_dtype(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(1, 3, 4, dtype=torch.float64)) \
            == torch.float64


@pytest.mark.parametrize("arch,limit", [(90, 232_448), (80, 166_912), (86, 101_376)])
def test_grouped_gemm_tiles_fit_tensor_cores_and_shared_memory(arch, limit):
    """The tile rules the compile gate checks in full (it compiles every launch): each dot has a
    multiple of 64 rows (wgmma on sm_90 needs 64 per warpgroup; mma.sync 16), and the pipelined
    operand tiles fit the architecture's shared memory."""
    for dtype in (torch.bfloat16, torch.float32):
        for n, m in ((768, 3072), (3072, 768), (2560, 10240), (10240, 2560)):
            f, g = gg.forward_tiles(arch, dtype, n, m), gg.wgrad_tiles(arch, dtype, n, m)
            assert f.block_r % 64 == 0 and g.block_k % 64 == 0
            assert f.block_r >= 16 * f.num_warps and g.block_k >= 16 * g.num_warps
            for rows, inner, cols, t in ((f.block_r, f.block_k, f.block_m, f), (g.block_k, g.block_r, g.block_m, g)):
                assert inner % 16 == 0 and cols % 16 == 0
                assert t.num_stages * (rows * inner + inner * cols) * dtype.itemsize <= limit


BIG_ROW = 2**20 + 3  # BIG_ROW * 2048 > 2^31: an int32 row offset would wrap


@pytest.mark.skipif(DEVICE != "cpu", reason="replaces the CPU interpreter's memory access")
def test_moe_kernels_index_rows_past_2_31_elements(far_memory):  # noqa: F811
    """Row offsets of [rows, hidden] tensors are int64 in the MoE kernels: each kernel addresses
    row BIG_ROW of a 2048-wide tensor (> 2^31 elements) exactly. The gating kernel's [T, E] tensor
    is left out: it would pass 2^31 elements only at 33M tokens with 64 experts."""
    H, bf16 = 2048, torch.bfloat16
    x, y = torch.zeros(1, H, dtype=bf16), torch.zeros(1, H, dtype=bf16)
    src = torch.tensor([BIG_ROW])
    far = far_memory(src, y)
    moe._gather_rows[(1,)](x, src, x, y, 1, H, HAS_SCALE=False, BLOCK_R=16, BLOCK_H=256)
    assert set(np.concatenate(far.loads).tolist()) == addresses(x, 2, [BIG_ROW], H, range(H))

    rows, out = torch.tensor([[BIG_ROW, -1]], dtype=torch.int32), torch.zeros(1, H, dtype=bf16)
    far = far_memory(rows, out)
    moe._combine_rows[(1,)](y, rows, y, out, 1, H, K=2, HAS_W=False, BLOCK_T=16, BLOCK_H=256)
    assert set(np.concatenate(far.loads).tolist()) == addresses(y, 2, [BIG_ROW], H, range(H))

    Kd, M, t = H, 32, gg.forward_tiles(0, bf16, H, 32)
    w = torch.zeros(1, Kd, M, dtype=bf16)
    offs = torch.tensor([0, BIG_ROW + t.block_r], dtype=torch.int32)
    expert, start = torch.tensor([0], dtype=torch.int32), torch.tensor([BIG_ROW], dtype=torch.int32)
    far = far_memory(w, offs, expert, start)
    gg._grouped_mm_kernel[(1, 1)](x, w, y, offs, expert, start, BIG_ROW + t.block_r, Kd, M, Kd * M, M, 1,
                                  BLOCK_R=t.block_r, BLOCK_M=t.block_m, BLOCK_K=t.block_k,
                                  DOT_PRECISION="ieee")
    tile_rows = range(BIG_ROW, BIG_ROW + t.block_r)
    assert set(np.concatenate(far.loads).tolist()) == addresses(x, 2, tile_rows, Kd, range(Kd))
    assert set(np.concatenate(far.stores).tolist()) == addresses(y, 2, tile_rows, M, range(t.block_m))

    t = gg.wgrad_tiles(0, bf16, Kd, M)
    dw = torch.zeros(1, t.block_k, t.block_m)
    offs = torch.tensor([BIG_ROW, BIG_ROW + t.block_r], dtype=torch.int32)
    far = far_memory(offs, dw)
    gg._grouped_wgrad_kernel[(1, 1, 1)](x, y, dw, offs, Kd, M, BLOCK_R=t.block_r, BLOCK_K=t.block_k,
                                        BLOCK_M=t.block_m, DOT_PRECISION="ieee")
    rows = range(BIG_ROW, BIG_ROW + t.block_r)
    want = addresses(x, 2, rows, Kd, range(t.block_k)) | addresses(y, 2, rows, M, range(t.block_m))
    assert set(np.concatenate(far.loads).tolist()) == want
