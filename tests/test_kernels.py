"""Triton kernels against their torch references, forward and gradients.

Without CUDA the kernels run under Triton's CPU interpreter. Triton decides when it is imported
(megatron-core imports it too) whether @triton.jit functions are interpreted, so tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA before any test module loads; this module checks
that it took effect. With CUDA the same cases run compiled on the GPU (tests/gpu/ has real sizes).
Inputs are float32 (what the kernels compute in), references run in float64. Tolerances: outputs
and lse 1e-5, gradients 1e-4 (absolute, unit-scale inputs); routing indices and counts exactly.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import triton  # noqa: F401,E402  (a dev dependency: its absence is an error, not a skip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/test_kernels.py needs TRITON_INTERPRET=1 on a machine without CUDA "
                       "(tests/conftest.py sets it unless TRITON_INTERPRET is already set)")

from megalong.kernels import linear_attention as la  # noqa: E402
from megalong.kernels import lsh_attention as lsh  # noqa: E402
from megalong.kernels import grouped_gemm as gg  # noqa: E402
from megalong.kernels import moe  # noqa: E402
from megalong.kernels import select  # noqa: E402
from megalong.kernels import window_attention as wa  # noqa: E402

OUT_TOL, GRAD_TOL = 1e-5, 1e-4
SMALL = (16, 16, 1)  # block_m, block_n, num_warps: several tiles on small shapes


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()


def _assert_match(outputs, references, inputs, seed=1):
    """Outputs and the gradients of a random linear function of them match the references'."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outputs]
    for o, r in zip(outputs, references):
        assert o.shape == r.shape
        assert (o.double() - r.double()).abs().max().item() < OUT_TOL
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), inputs)
    want = torch.autograd.grad(sum((r * w.to(r.dtype)).sum() for r, w in zip(references, weights)), inputs)
    for a, b in zip(got, want):
        assert (a.double() - b.double()).abs().max().item() < GRAD_TOL


# ---- windowed attention ------------------------------------------------------------------------

def test_window_reference_equals_element_by_element_mask():
    from megalong.attention.reference import explicit_mask

    L, window, d, globals_ = 13, 3, 2, {1, 6}
    mask = explicit_mask(L, lambda i, j: j <= i and (((i - j) % d == 0 and i - j < window * d) or j in globals_))
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    q, k, v = (torch.randn(1, 2, L, 4, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2) * 0.7 - slopes.view(-1, 1, 1) * (
        torch.arange(L).view(-1, 1) - torch.arange(L)).double()
    scores = scores.masked_fill(~mask, float("-inf"))
    out, lse = wa.reference_window_attention(q, k, v, 0.7, window, d, slopes, torch.tensor(sorted(globals_)))
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-12)


WINDOW_CASES = [  # batch, heads, L, head_dim, window, dilation, alibi, global keys
    (1, 2, 37, 16, 5, 1, False, None),  # ragged: 37 is no multiple of the 16-row blocks
    (2, 2, 37, 24, 5, 3, True, [0, 7, 20]),  # dilation, ALiBi, global keys, head_dim 24 (padded to 32)
    (1, 1, 1, 16, 4, 1, True, None),  # one token
    (1, 2, 20, 16, 64, 1, True, None),  # window >= L
    (1, 1, 33, 16, 40, 2, False, [3]),  # window * dilation >= L, with a global key
]


@pytest.mark.parametrize("b,h,L,D,window,dilation,alibi,global_keys", WINDOW_CASES)
def test_window_attention_matches_reference(b, h, L, D, window, dilation, alibi, global_keys):
    q, k, v = _rand(b, h, L, D, seed=0), _rand(b, h, L, D, seed=1), _rand(b, h, L, D, seed=2)
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(3)).to(DEVICE) if alibi else None
    keys = None if global_keys is None else torch.tensor(global_keys, device=DEVICE)
    got = wa.window_attention(q, k, v, 0.3, window, dilation, slopes, keys, blocks=SMALL)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, window, dilation,
                                         None if slopes is None else slopes.double(), keys)
    _assert_match(got, want, (q, k, v))


def test_window_attention_query_positions_full_causal():
    """Rows at arbitrary positions over the whole causal prefix (Longformer's global rows)."""
    L = 40
    q, k, v = _rand(1, 2, 4, 16, seed=0), _rand(1, 2, L, 16, seed=1), _rand(1, 2, L, 16, seed=2)
    pos, slopes = torch.tensor([0, 7, 20, 39], device=DEVICE), torch.tensor([0.5, 0.1], device=DEVICE)
    got = wa.window_attention(q, k, v, 0.3, None, 1, slopes, None, pos, blocks=SMALL)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, None, 1,
                                         slopes.double(), None, pos)
    _assert_match(got, want, (q, k, v))


def test_window_attention_default_blocks():
    """The H100 default tiles (64 x 64) on a ragged length, no lse gradient."""
    q, k, v = _rand(1, 1, 70, 64, seed=0), _rand(1, 1, 70, 64, seed=1), _rand(1, 1, 70, 64, seed=2)
    out, _ = wa.window_attention(q, k, v, 0.125, 9)
    ref, _ = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.125, 9)
    _assert_match([out], [ref], (q, k, v))


def _attn_config(heads, head_dim=16):
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


@pytest.mark.parametrize("kwargs", [dict(window=4, dilation=[1, 2], alibi=True),
                                    dict(window=3, dilation=2, global_tokens=[0, 9])])
def test_local_attend_equals_local_attention(kwargs):
    from megalong.attention.local import LocalAttention

    heads = 2
    module = LocalAttention(_attn_config(heads), 1, **kwargs)
    n = 2 * heads if kwargs.get("global_tokens") else heads
    q, k, v = _rand(1, n, 19, 16, seed=0), _rand(1, n, 19, 16, seed=1), _rand(1, n, 19, 16, seed=2)
    _assert_match([select.local_attend(module, q, k, v)], [module.attend(q, k, v)], (q, k, v))


def test_global_alibi_attend_equals_global_attention():
    from megalong.attention.global_attention import GlobalAttention

    module = GlobalAttention(_attn_config(2), 1, alibi=True)
    q, k, v = _rand(1, 2, 21, 16, seed=0), _rand(1, 2, 21, 16, seed=1), _rand(1, 2, 21, 16, seed=2)
    _assert_match([select.global_alibi_attend(module, q, k, v)], [module.attend(q, k, v)], (q, k, v))


# ---- FAM block attention -----------------------------------------------------------------------

def _naive_fam_blocks(q, k, v, k_fam, v_fam, B, memory, scale, slopes=None):
    """TransformerFAM's block-token attention from its definition, one query at a time: the query
    at p = t * B + i sees keys j of blocks t - memory .. t with j <= p (distance p - j) and the
    FAM keys of its block, F_{t-1}, standing at position t * B - 1."""
    out = torch.empty_like(q)
    for p in range(q.shape[2]):
        t = p // B
        first = max(t - memory, 0) * B
        keys, values = k[:, :, first:p + 1], v[:, :, first:p + 1]
        key_pos = torch.arange(first, p + 1, dtype=q.dtype)
        if k_fam is not None:
            keys, values = torch.cat([k_fam[:, :, t], keys], 2), torch.cat([v_fam[:, :, t], values], 2)
            key_pos = torch.cat([torch.full((k_fam.shape[3],), t * B - 1.0, dtype=q.dtype), key_pos])
        scores = torch.einsum("bhd,bhjd->bhj", q[:, :, p], keys) * scale
        if slopes is not None:
            scores = scores - slopes.view(-1, 1) * (p - key_pos)
        out[:, :, p] = torch.einsum("bhj,bhjd->bhd", torch.softmax(scores, -1), values)
    return out


def _fam_module(heads, B, memory, fam_length, alibi, head_dim=16):
    from megalong.attention.fam import FamAttention

    return FamAttention(_attn_config(heads, head_dim), 1, block_size=B, memory_segments=memory,
                        fam_length=fam_length, alibi=alibi)


def _fam_inputs(b, h, L, D, B, fam_length):
    q, k, v = (_rand(b, h, L, D, seed=s) for s in range(3))
    n = -(-L // B)
    kf, vf = (_rand(b, h, n, fam_length, D, seed=s) if fam_length else None for s in (3, 4))
    return q, k, v, kf, vf


FAM_CASES = [  # batch, heads, L, head_dim, block_size, memory_segments, fam_length, alibi
    (1, 2, 37, 16, 8, 1, 3, True),  # ragged last block; blocks smaller than the 16-row tiles
    (2, 2, 37, 16, 16, 2, 0, False),  # no FAM, two memory blocks, ragged
    (1, 2, 40, 24, 24, 0, 20, True),  # two query tiles per block, two FAM key tiles, head_dim 24
    (1, 1, 5, 16, 16, 1, 2, True),  # L < block_size
    (1, 2, 16, 16, 16, 2, 4, False),  # one block: memory reaches before the sequence
]


@pytest.mark.parametrize("b,h,L,D,B,memory,fam_length,alibi", FAM_CASES[:3])
def test_fam_blocks_torch_path_equals_naive_definition(b, h, L, D, B, memory, fam_length, alibi):
    """The torch path the kernel is compared with, against the per-query definition (float64)."""
    module = _fam_module(h, B, memory, fam_length, alibi, D)
    inputs = _fam_inputs(b, h, L, D, B, fam_length)
    q, k, v, kf, vf = (None if x is None else x.detach().double() for x in inputs)
    slopes = module.alibi_slopes(q.device, torch.float64) if alibi else None
    select.set_mode("reference")
    try:
        got = module.blocks(q, k, v, kf, vf)
    finally:
        select.set_mode("auto")
    assert (got - _naive_fam_blocks(q, k, v, kf, vf, B, memory, module.scale, slopes)).abs().max().item() < 1e-12


@pytest.mark.parametrize("b,h,L,D,B,memory,fam_length,alibi", FAM_CASES)
def test_fam_block_attention_matches_torch_path(b, h, L, D, B, memory, fam_length, alibi):
    from megalong.kernels.fam_attention import fam_block_attention

    module = _fam_module(h, B, memory, fam_length, alibi, D)
    q, k, v, kf, vf = _fam_inputs(b, h, L, D, B, fam_length)
    slopes = module.alibi_slopes(q.device, torch.float32) if alibi else None
    got = fam_block_attention(q, k, v, kf, vf, module.scale, B, memory, slopes, blocks=SMALL)
    select.set_mode("reference")  # on CUDA the module would otherwise take the kernel itself
    try:
        want = module.blocks(q.double(), k.double(), v.double(),
                             *(None if x is None else x.double() for x in (kf, vf)))
    finally:
        select.set_mode("auto")
    inputs = (q, k, v) + ((kf, vf) if fam_length else ())
    _assert_match([got], [want], inputs)


def test_fam_block_attention_default_blocks():
    """The H100 default tiles (64 x 64): a 96-token block holds two query tiles, ragged L."""
    from megalong.kernels.fam_attention import fam_block_attention

    module = _fam_module(1, 96, 1, 5, True, 64)
    q, k, v, kf, vf = _fam_inputs(1, 1, 150, 64, 96, 5)
    got = fam_block_attention(q, k, v, kf, vf, module.scale, 96, 1, module.alibi_slopes(q.device, torch.float32))
    select.set_mode("reference")
    try:
        want = module.blocks(q.double(), k.double(), v.double(), kf.double(), vf.double())
    finally:
        select.set_mode("auto")
    _assert_match([got], [want], (q, k, v, kf, vf))


@pytest.mark.parametrize("fam_length,alibi", [(3, True), (0, False)])
def test_fam_model_on_kernels_equals_reference(monkeypatch, fam_length, alibi):
    """A two-layer fam GPT (FAM chain, memory blocks, ragged last block), forced onto the kernel:
    loss and every parameter's gradient equal the torch path's."""
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model, position_ids_for
    from megalong.parallel.distributed import initialize, shutdown

    cfg = config_from_dict({"model": {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 24,
        "attention_layers": ["fam", "fam"], "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "alibi": alibi, "position_embedding": "none" if alibi else "learned",
        "attention": {"fam": {"block_size": 8, "memory_segments": 1, "fam_length": fam_length}}}})
    validate(cfg, check_paths=False, world_size=1)
    initialize(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg, 64).to(DEVICE)
        tokens = (torch.arange(42).view(2, 21) * 7 % 64).to(DEVICE)  # 21: a short last block

        def loss_and_grads():
            model.zero_grad()
            loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
            loss.backward()
            return loss, [p.grad.clone() for p in model.parameters()]

        select.set_mode("reference")
        want, want_grads = loss_and_grads()
        select.set_mode("auto")
        calls = []
        use = select.use_kernels
        monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: calls.append(1) or True)
        got, got_grads = loss_and_grads()
        monkeypatch.setattr(select, "use_kernels", use)
    finally:
        select.set_mode("auto")
        shutdown()
    assert len(calls) == 2  # one kernel call per layer
    assert abs(got.item() - want.item()) < OUT_TOL
    for a, b in zip(got_grads, want_grads):
        assert (a - b).abs().max().item() < GRAD_TOL


# ---- linear attention --------------------------------------------------------------------------

def _linear_loop(q, k, v, eps):
    """Token-by-token definition: out_i = phi(q_i) S_i / (phi(q_i) z_i + eps)."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    outs = []
    for i in range(q.shape[2]):
        S = torch.einsum("bhjd,bhje->bhde", fk[:, :, :i + 1], v[:, :, :i + 1])
        z = fk[:, :, :i + 1].sum(2)
        num = torch.einsum("bhd,bhde->bhe", fq[:, :, i], S)
        outs.append(num / ((fq[:, :, i] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, 2)


@pytest.mark.parametrize("b,h,L,D,E,chunk", [(1, 2, 37, 16, 16, 16), (2, 1, 1, 16, 24, 16),
                                             (1, 1, 50, 20, 32, 32)])
def test_linear_attention_matches_reference(b, h, L, D, E, chunk):
    q, k, v = _rand(b, h, L, D, seed=0), _rand(b, h, L, D, seed=1), _rand(b, h, L, E, seed=2)
    got = la.linear_attention(q, k, v, 1e-6, chunk)
    want = la.reference_linear_attention(q.double(), k.double(), v.double(), 1e-6, chunk)
    _assert_match([got], [want], (q, k, v))
    loop = _linear_loop(q.double(), k.double(), v.double(), 1e-6)
    assert (want - loop).abs().max().item() < 1e-10


def test_linear_attend_equals_linear_attention():
    from megalong.attention.linear import LinearAttention

    module = LinearAttention(_attn_config(2), 1, chunk_size=16)
    q, k, v = _rand(1, 2, 29, 16, seed=0), _rand(1, 2, 29, 16, seed=1), _rand(1, 2, 29, 16, seed=2)
    _assert_match([select.linear_attend(module, q, k, v)], [module.attend(q, k, v)], (q, k, v))
    assert select.linear_attend(LinearAttention(_attn_config(2), 1, normalization="efficient"), q, k, v) is None


# ---- LSH chunk attention -----------------------------------------------------------------------

def _sorted_rounds(b, h, n, L, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lp = -(-L // c) * c
    buckets = torch.randint(0, 4, (b, h, n, Lp), generator=g)
    buckets[..., L:] = 4
    pos = torch.arange(Lp)
    order = torch.argsort(buckets * Lp + pos, -1)
    chunk_of = torch.empty_like(order).scatter_(-1, order, (pos // c).expand_as(order))
    return order.to(DEVICE), chunk_of.to(DEVICE), Lp


@pytest.mark.parametrize("b,h,n,L,D,alibi", [(1, 2, 1, 37, 16, False), (2, 2, 2, 40, 24, True),
                                             (1, 1, 3, 5, 16, False)])
def test_lsh_chunk_attention_matches_reference(b, h, n, L, D, alibi):
    c = 16
    order, chunk_of, Lp = _sorted_rounds(b, h, n, L, c)
    sq, sk, sv = (_rand(b, h, n, Lp, D, seed=s) for s in range(3))
    slopes = torch.tensor([0.5, 0.25][:h], device=DEVICE) if alibi else None
    got = lsh.lsh_chunk_attention(sq, sk, sv, order, chunk_of, c, 0.4, slopes)
    want = lsh.reference_lsh_chunk_attention(sq.double(), sk.double(), sv.double(), order, chunk_of, c,
                                             0.4, None if slopes is None else slopes.double())
    _assert_match(got, want, (sq, sk, sv))


@pytest.mark.parametrize("n_hashes,alibi", [(1, False), (2, True)])
def test_lsh_attend_equals_lsh_attention(n_hashes, alibi):
    from megalong.attention.lsh import LshAttention

    module = LshAttention(_attn_config(2), 1, n_hashes=n_hashes, bucket_size=16, alibi=alibi)
    q, v = _rand(1, 2, 45, 16, seed=0), _rand(1, 2, 45, 16, seed=2)
    _assert_match([select.lsh_attend(module, q, q, v)], [module.attend(q, q, v)], (q, v))


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
    want = moe.reference_topk_gating(logits.double(), k, renormalize, selection_bias)
    assert torch.equal(got.expert_index, want.expert_index)
    assert torch.equal(got.counts, want.counts)
    if force is not None:
        assert got.counts[force].item() == T
    _assert_match([got.probs, got.gates], [want.probs, want.gates], (logits,))


@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [11, 0, 0, 0], [20, 0, 37, 5]])  # idle expert; all on one
def test_grouped_mm_matches_loop(counts):
    tokens = torch.tensor(counts, device=DEVICE)
    x, w = _rand(sum(counts), 24, seed=0), _rand(4, 24, 40, seed=1)
    _assert_match([gg.grouped_mm(x, w, tokens)], [gg.reference_grouped_mm(x.double(), w.double(), tokens)],
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
    x = _rand(23, 24, seed=3)
    got, want = select.topk_route(router, x), router(x)
    assert torch.equal(got.expert_index, want.expert_index) and torch.equal(got.kept, want.kept)
    assert torch.equal(got.load, want.load)
    d_got = plan(got.expert_index, got.gates, got.kept, 4)
    d_want = plan(want.expert_index, want.gates, want.kept, 4)
    out = select.moe_experts(experts, x, d_got, router.top_k)
    ref = unpermute(experts(permute(x, d_want), d_want.tokens_per_expert), d_want, x.shape[0])
    params = (x, router.weight, experts.w1, experts.w2, experts.w3)
    _assert_match([out, got.aux_loss], [ref, want.aux_loss], params)


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
    x, w = _rand(62, 40, seed=0), _rand(4, 40, 56, seed=1)
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
    x = _rand(23, 24, seed=3)
    index = torch.randint(0, 4, (23, 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    index[:, 1] = (index[:, 0] + 1) % 4
    gates = torch.rand(23, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    d = plan(index, gates, torch.ones_like(index, dtype=torch.bool), 4)
    params = (x, experts.w1, experts.w2, experts.w3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = select.moe_experts(experts, x, d, 2)
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
    x = _rand(23, 24, seed=3)
    plain = router(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = select.topk_route(router, x), router(x)
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


class _FarMemory:
    """Stands in for the interpreter's memory access: loads and stores inside `tensors` run, those
    elsewhere are recorded (byte addresses) instead, loads returning zeros. Lets a kernel compute
    the addresses of a tensor past 2^31 elements without allocating it."""

    def __init__(self, memory, tensors):
        self.memory = memory
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
        self.loads, self.stores = [], []

    def __getattr__(self, name):
        return getattr(self.memory, name)

    def _inside(self, addresses):
        return any(((addresses >= lo) & (addresses < hi)).all() for lo, hi in self.ranges)

    def load(self, ptrs, mask, other, dtype):
        if self._inside(ptrs[mask]):
            return self.memory.load(ptrs, mask, other, dtype)
        self.loads.append(ptrs[mask].astype("int64"))
        return other.copy()

    def store(self, ptrs, value, mask):
        if self._inside(ptrs[mask]):
            return self.memory.store(ptrs, value, mask)
        self.stores.append(ptrs[mask].astype("int64"))


@pytest.fixture
def far_memory(monkeypatch):
    from triton.runtime import interpreter

    memory = interpreter._interpreter

    def install(*tensors):
        far = _FarMemory(memory, tensors)
        monkeypatch.setattr(interpreter, "_interpreter", far)
        return far
    return install


def _addresses(base: torch.Tensor, element_size: int, rows, row_len: int, cols) -> set:
    """Byte addresses of [rows x cols] of a row-major tensor at `base` with rows of row_len."""
    return {base.data_ptr() + element_size * (r * row_len + c) for r in rows for c in cols}


BIG_ROW = 2**20 + 3  # BIG_ROW * 2048 > 2^31: an int32 row offset would wrap


@pytest.mark.skipif(DEVICE != "cpu", reason="replaces the CPU interpreter's memory access")
def test_moe_kernels_index_rows_past_2_31_elements(far_memory):
    """Row offsets of [rows, hidden] tensors are int64 in the MoE kernels: each kernel addresses
    row BIG_ROW of a 2048-wide tensor (> 2^31 elements) exactly. The gating kernel's [T, E] tensor
    is left out: it would pass 2^31 elements only at 33M tokens with 64 experts."""
    H, bf16 = 2048, torch.bfloat16
    x, y = torch.zeros(1, H, dtype=bf16), torch.zeros(1, H, dtype=bf16)
    src = torch.tensor([BIG_ROW])
    far = far_memory(src, y)
    moe._gather_rows[(1,)](x, src, x, y, 1, H, HAS_SCALE=False, BLOCK_R=16, BLOCK_H=256)
    assert set(np.concatenate(far.loads).tolist()) == _addresses(x, 2, [BIG_ROW], H, range(H))

    rows, out = torch.tensor([[BIG_ROW, -1]], dtype=torch.int32), torch.zeros(1, H, dtype=bf16)
    far = far_memory(rows, out)
    moe._combine_rows[(1,)](y, rows, y, out, 1, H, K=2, HAS_W=False, BLOCK_T=16, BLOCK_H=256)
    assert set(np.concatenate(far.loads).tolist()) == _addresses(y, 2, [BIG_ROW], H, range(H))

    Kd, M, t = H, 32, gg.forward_tiles(0, bf16, H, 32)
    w = torch.zeros(1, Kd, M, dtype=bf16)
    offs = torch.tensor([0, BIG_ROW + t.block_r], dtype=torch.int32)
    expert, start = torch.tensor([0], dtype=torch.int32), torch.tensor([BIG_ROW], dtype=torch.int32)
    far = far_memory(w, offs, expert, start)
    gg._grouped_mm_kernel[(1, 1)](x, w, y, offs, expert, start, BIG_ROW + t.block_r, Kd, M, Kd * M, M, 1,
                                  BLOCK_R=t.block_r, BLOCK_M=t.block_m, BLOCK_K=t.block_k,
                                  DOT_PRECISION="ieee")
    tile_rows = range(BIG_ROW, BIG_ROW + t.block_r)
    assert set(np.concatenate(far.loads).tolist()) == _addresses(x, 2, tile_rows, Kd, range(Kd))
    assert set(np.concatenate(far.stores).tolist()) == _addresses(y, 2, tile_rows, M, range(t.block_m))

    t = gg.wgrad_tiles(0, bf16, Kd, M)
    dw = torch.zeros(1, t.block_k, t.block_m)
    offs = torch.tensor([BIG_ROW, BIG_ROW + t.block_r], dtype=torch.int32)
    far = far_memory(offs, dw)
    gg._grouped_wgrad_kernel[(1, 1, 1)](x, y, dw, offs, Kd, M, BLOCK_R=t.block_r, BLOCK_K=t.block_k,
                                        BLOCK_M=t.block_m, DOT_PRECISION="ieee")
    rows = range(BIG_ROW, BIG_ROW + t.block_r)
    want = _addresses(x, 2, rows, Kd, range(t.block_k)) | _addresses(y, 2, rows, M, range(t.block_m))
    assert set(np.concatenate(far.loads).tolist()) == want


# ---- selection ---------------------------------------------------------------------------------

def test_selection_runs_reference_on_cpu_and_when_forced():
    x = torch.zeros(2)
    assert not select.use_kernels(x)  # CPU tensors: the torch path
    select.set_mode("reference")
    try:
        assert not select.use_kernels(x)
    finally:
        select.set_mode("auto")
    with pytest.raises(ValueError, match="execution.kernels"):
        select.set_mode("fast")


def test_modules_take_the_kernel_path_when_selected(monkeypatch):
    """The wiring in the attention and MoE modules: forced onto the kernels (here interpreted),
    each module computes what its torch path computes."""
    from megalong.attention.global_attention import GlobalAttention
    from megalong.attention.linear import LinearAttention
    from megalong.attention.local import LocalAttention
    from megalong.attention.lsh import LshAttention
    from megalong.moe.layer import MoELayer

    torch.manual_seed(0)
    q, k, v = _rand(1, 2, 21, 16, seed=0), _rand(1, 2, 21, 16, seed=1), _rand(1, 2, 21, 16, seed=2)
    modules = [LocalAttention(_attn_config(2), 1, window=5, alibi=True), GlobalAttention(_attn_config(2), 1, alibi=True),
               LinearAttention(_attn_config(2), 1, chunk_size=16), LshAttention(_attn_config(2), 1, bucket_size=16)]
    config = SimpleNamespace(hidden_size=16, ffn_hidden_size=32, gated_linear_unit=False, init_method_std=0.3,
                             num_layers=2, activation_func=F.gelu)
    layer = MoELayer(config, options={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}).to(DEVICE)
    x = _rand(7, 3, 16, seed=4)
    want = [m.attend(q, k, v) for m in modules] + [layer(x)[0], layer.aux_loss]
    calls = []
    monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: calls.append(1) or True)
    got = [m.attend(q, k, v) for m in modules] + [layer(x)[0], layer.aux_loss]
    assert len(calls) == 5
    _assert_match(got, want, (q, k, v, x, layer.router.weight, layer.experts.w1))
