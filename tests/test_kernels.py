"""Triton kernels against their torch references, forward and gradients.

Without CUDA the kernels run under Triton's CPU interpreter. Triton decides when it is imported
(megatron-core imports it too) whether @triton.jit functions are interpreted, so tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA before any test module loads; this module checks
that it took effect. With CUDA the same cases run compiled on the GPU (tests/gpu/ has real sizes).
Helpers and tolerances: tests/kernel_helpers.py (MoE kernels: tests/test_kernels_moe.py).
Inputs are float32 (what the kernels compute in), references run in float64. Tolerances: outputs
and lse 1e-5, gradients 1e-4 (absolute, unit-scale inputs); routing indices and counts exactly.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import DEVICE, GRAD_TOL, OUT_TOL, SMALL, assert_match, attn_config, rand, sorted_rounds
from megalong.kernels import linear_attention as la
from megalong.kernels import lsh_attention as lsh
from megalong.kernels import select
from megalong.kernels import window_attention as wa
from megalong.kernels.arch import target_arch


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
    (1, 1, 37, 128, 6, 2, True, [4]),  # head_dim 128
]


@pytest.mark.parametrize("b,h,L,D,window,dilation,alibi,global_keys", WINDOW_CASES)
def test_window_attention_matches_reference(b, h, L, D, window, dilation, alibi, global_keys):
    q, k, v = rand(b, h, L, D, seed=0), rand(b, h, L, D, seed=1), rand(b, h, L, D, seed=2)
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(3)).to(DEVICE) if alibi else None
    keys = None if global_keys is None else torch.tensor(global_keys, device=DEVICE)
    got = wa.window_attention(q, k, v, 0.3, window, dilation, slopes, keys, blocks=SMALL)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, window, dilation,
                                         None if slopes is None else slopes.double(), keys)
    assert_match(got, want, (q, k, v))


def test_window_attention_query_positions_full_causal():
    """Rows at arbitrary positions over the whole causal prefix (Longformer's global rows)."""
    L = 40
    q, k, v = rand(1, 2, 4, 16, seed=0), rand(1, 2, L, 16, seed=1), rand(1, 2, L, 16, seed=2)
    pos, slopes = torch.tensor([0, 7, 20, 39], device=DEVICE), torch.tensor([0.5, 0.1], device=DEVICE)
    got = wa.window_attention(q, k, v, 0.3, None, 1, slopes, None, pos, blocks=SMALL)
    want = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.3, None, 1,
                                         slopes.double(), None, pos)
    assert_match(got, want, (q, k, v))


@pytest.mark.parametrize("arch,D", [(90, 64), (80, 128)])
def test_window_attention_default_blocks(arch, D):
    """The tiles an sm_90 / sm_80 launch takes (megalong.kernels.tuning) on a ragged length, no lse
    gradient."""
    q, k, v = rand(1, 1, 70, D, seed=0), rand(1, 1, 70, D, seed=1), rand(1, 1, 70, D, seed=2)
    with target_arch(arch):
        out, _ = wa.window_attention(q, k, v, 0.125, 9)
    ref, _ = wa.reference_window_attention(q.double(), k.double(), v.double(), 0.125, 9)
    assert_match([out], [ref], (q, k, v))


def on_kernels_and_torch(run):
    """(run() with the modules forced onto the kernels (interpreted on the CPU), run() on the torch path)."""
    select.set_mode("reference")
    try:
        want = run()
    finally:
        select.set_mode("auto")
    use = select.use_kernels
    select.use_kernels = lambda *a, **kw: True
    try:
        got = run()
    finally:
        select.use_kernels = use
    return got, want


@pytest.mark.parametrize("kwargs", [dict(window=4, dilation=[1, 2], alibi=True),
                                    dict(window=3, dilation=2, global_tokens=[0, 9])])
def test_local_attend_equals_local_attention(kwargs):
    from megalong.attention.local import LocalAttention

    heads = 2
    module = LocalAttention(attn_config(heads), 1, **kwargs)
    n = 2 * heads if kwargs.get("global_tokens") else heads
    q, k, v = rand(1, n, 19, 16, seed=0), rand(1, n, 19, 16, seed=1), rand(1, n, 19, 16, seed=2)
    assert_match(*on_kernels_and_torch(lambda: [module.attend(q, k, v)]), (q, k, v))


def test_global_alibi_attend_equals_global_attention():
    from megalong.attention.global_attention import GlobalAttention

    module = GlobalAttention(attn_config(2), 1, alibi=True)
    q, k, v = rand(1, 2, 21, 16, seed=0), rand(1, 2, 21, 16, seed=1), rand(1, 2, 21, 16, seed=2)
    assert_match(*on_kernels_and_torch(lambda: [module.attend(q, k, v)]), (q, k, v))


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

    return FamAttention(attn_config(heads, head_dim), 1, block_size=B, memory_segments=memory,
                        fam_length=fam_length, alibi=alibi)


def _fam_inputs(b, h, L, D, B, fam_length):
    q, k, v = (rand(b, h, L, D, seed=s) for s in range(3))
    n = -(-L // B)
    kf, vf = (rand(b, h, n, fam_length, D, seed=s) if fam_length else None for s in (3, 4))
    return q, k, v, kf, vf


FAM_CASES = [  # batch, heads, L, head_dim, block_size, memory_segments, fam_length, alibi
    (1, 2, 37, 16, 8, 1, 3, True),  # ragged last block; blocks smaller than the 16-row tiles
    (2, 2, 37, 16, 16, 2, 0, False),  # no FAM, two memory blocks, ragged
    (1, 2, 40, 24, 24, 0, 20, True),  # two query tiles per block, two FAM key tiles, head_dim 24
    (1, 1, 5, 16, 16, 1, 2, True),  # L < block_size
    (1, 2, 16, 16, 16, 2, 4, False),  # one block: memory reaches before the sequence
    (1, 1, 37, 128, 16, 1, 3, True),  # head_dim 128
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
    assert_match([got], [want], inputs)


@pytest.mark.parametrize("arch,D", [(90, 128), (80, 64)])
def test_fam_block_attention_default_blocks(arch, D):
    """The tiles an sm_90 / sm_80 launch takes (64-row): a 96-token block holds two query tiles,
    ragged L."""
    from megalong.kernels.fam_attention import fam_block_attention

    module = _fam_module(1, 96, 1, 5, True, D)
    q, k, v, kf, vf = _fam_inputs(1, 1, 150, D, 96, 5)
    with target_arch(arch):
        got = fam_block_attention(q, k, v, kf, vf, module.scale, 96, 1,
                                  module.alibi_slopes(q.device, torch.float32))
    select.set_mode("reference")
    try:
        want = module.blocks(q.double(), k.double(), v.double(), kf.double(), vf.double())
    finally:
        select.set_mode("auto")
    assert_match([got], [want], (q, k, v, kf, vf))


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
                                             (1, 1, 50, 20, 32, 32), (1, 1, 37, 128, 128, 16)])
def test_linear_attention_matches_reference(b, h, L, D, E, chunk):
    q, k, v = rand(b, h, L, D, seed=0), rand(b, h, L, D, seed=1), rand(b, h, L, E, seed=2)
    got = la.linear_attention(q, k, v, 1e-6, chunk)
    want = la.reference_linear_attention(q.double(), k.double(), v.double(), 1e-6, chunk)
    assert_match([got], [want], (q, k, v))
    loop = _linear_loop(q.double(), k.double(), v.double(), 1e-6)
    assert (want - loop).abs().max().item() < 1e-10


def test_linear_attend_equals_linear_attention(monkeypatch):
    """The module's wiring to the kernel, in float32 (compared exactly enough); on a GPU float32
    takes the torch path (tuning.linear_kernel_covers, tested below), which is lifted here."""
    import megalong.attention.linear as linear
    from megalong.attention.linear import LinearAttention

    monkeypatch.setattr(linear, "linear_kernel_covers", lambda *a: True)
    module = LinearAttention(attn_config(2), 1, chunk_size=16)
    q, k, v = rand(1, 2, 29, 16, seed=0), rand(1, 2, 29, 16, seed=1), rand(1, 2, 29, 16, seed=2)
    assert_match(*on_kernels_and_torch(lambda: [module.attend(q, k, v)]), (q, k, v))
    efficient = LinearAttention(attn_config(2), 1, normalization="efficient")  # no kernel: the torch path
    got, want = on_kernels_and_torch(lambda: efficient.attend(q, k, v))
    assert torch.equal(got, want)


LINEAR_BF16_REL = 2e-2  # ||got - want|| / ||want||: bf16 inputs, features, scores and state as dot
# operands (measured 2e-3 on outputs, 8e-3 on gradients at head_dim 16 and 64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("L,D,chunk", [(37, 16, 16), (50, 64, 32)])
def test_linear_attend_bf16_inputs_reach_the_kernel(monkeypatch, L, D, chunk):
    """bf16 q, k, v go into the kernels as they are (float32 accumulators, the state rounded to
    bf16 as a dot operand); outputs and gradients match float64 on the same bf16 values."""
    from triton.runtime.jit import KernelInterface

    from megalong.attention.linear import LinearAttention

    seen, launch = [], KernelInterface.__getitem__

    def recording(kernel, grid):
        run = launch(kernel, grid)

        def record(*args, **kwargs):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            seen.append((kernel.fn.__name__, {n: t.dtype for n, t in named.items() if torch.is_tensor(t)}))
            return run(*args, **kwargs)
        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", recording)
    monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: True)
    module = LinearAttention(attn_config(2, D), 1, chunk_size=chunk)
    q, k, v = (rand(1, 2, L, D, seed=s).detach().bfloat16().requires_grad_() for s in range(3))
    out = module.attend(q, k, v)
    assert out.dtype == torch.bfloat16
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
    names = [name for name, _ in seen]
    assert names == ["_linear_fwd", "_linear_bwd_dq", "_linear_bwd_dk", "_linear_bwd_dv"]
    assert all(dtypes[n] == torch.bfloat16 for _, dtypes in seen for n in ("FQ", "FK", "V") if n in dtypes)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = la.reference_linear_attention(*inputs, 1e-6, chunk)
    want_grads = torch.autograd.grad((want * weight.double()).sum(), inputs)
    assert _rel(out, want) < LINEAR_BF16_REL
    for a, b in zip(got, want_grads):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < LINEAR_BF16_REL


@pytest.mark.parametrize("dtype,D,kernel", [(torch.float32, 128, False), (torch.float32, 64, False),
                                            (torch.bfloat16, 128, True), (torch.bfloat16, 64, True)])
def test_linear_attend_leaves_float32_to_torch(monkeypatch, dtype, D, kernel):
    """float32 spills in the linear kernels (tuning.linear_kernel_covers): the module runs its
    torch chunked path for float32 and the kernel for 16-bit operands."""
    import megalong.attention.linear as linear

    calls = []
    monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: True)
    monkeypatch.setattr(linear, "elu_kernel", lambda q, *a: calls.append(q.dtype) or torch.zeros_like(q))
    module = linear.LinearAttention(attn_config(2, D), 1, chunk_size=16)
    q, k, v = (rand(1, 2, 20, D, seed=s).to(dtype) for s in range(3))
    out = module.attend(q, k, v)
    assert calls == ([dtype] if kernel else [])
    if not kernel:
        want = la.reference_linear_attention(q.double(), k.double(), v.double(), 1e-6, 16)
        assert _rel(out, want) < 1e-5


# ---- LSH chunk attention -----------------------------------------------------------------------

@pytest.mark.parametrize("b,h,n,L,D,alibi,c", [(1, 2, 1, 37, 16, False, 16), (2, 2, 2, 40, 24, True, 16),
                                               (1, 1, 3, 5, 16, False, 16), (1, 1, 2, 37, 128, True, 16),
                                               (1, 2, 2, 70, 24, True, 32)])
def test_lsh_chunk_attention_matches_reference(b, h, n, L, D, alibi, c):
    """c = 32: two query blocks per chunk and four key steps per program (16 x 16 tiles)."""
    order, chunk_of, Lp = sorted_rounds(b, h, n, L, c)
    sq, sk, sv = (rand(b, h, n, Lp, D, seed=s) for s in range(3))
    slopes = torch.tensor([0.5, 0.25][:h], device=DEVICE) if alibi else None
    got = lsh.lsh_chunk_attention(sq, sk, sv, order, chunk_of, c, 0.4, slopes)
    want = lsh.reference_lsh_chunk_attention(sq.double(), sk.double(), sv.double(), order, chunk_of, c,
                                             0.4, None if slopes is None else slopes.double())
    assert_match(got, want, (sq, sk, sv))


@pytest.mark.parametrize("n_hashes,alibi", [(1, False), (2, True)])
def test_lsh_attend_equals_lsh_attention(n_hashes, alibi):
    from megalong.attention.lsh import LshAttention

    module = LshAttention(attn_config(2), 1, n_hashes=n_hashes, bucket_size=16, alibi=alibi)
    q, v = rand(1, 2, 45, 16, seed=0), rand(1, 2, 45, 16, seed=2)
    assert_match(*on_kernels_and_torch(lambda: [module.attend(q, q, v)]), (q, v))


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

    import megalong.attention.linear as linear

    monkeypatch.setattr(linear, "linear_kernel_covers", lambda *a: True)  # float32 on the kernel here
    torch.manual_seed(0)
    q, k, v = rand(1, 2, 21, 16, seed=0), rand(1, 2, 21, 16, seed=1), rand(1, 2, 21, 16, seed=2)
    modules = [LocalAttention(attn_config(2), 1, window=5, alibi=True), GlobalAttention(attn_config(2), 1, alibi=True),
               LinearAttention(attn_config(2), 1, chunk_size=16), LshAttention(attn_config(2), 1, bucket_size=16)]
    config = SimpleNamespace(hidden_size=16, ffn_hidden_size=32, gated_linear_unit=False, init_method_std=0.3,
                             num_layers=2, activation_func=F.gelu)
    layer = MoELayer(config, options={"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}).to(DEVICE)
    x = rand(7, 3, 16, seed=4)
    want = [m.attend(q, k, v) for m in modules] + [layer(x)[0], layer.aux_loss]
    calls = []
    monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: calls.append(1) or True)
    got = [m.attend(q, k, v) for m in modules] + [layer(x)[0], layer.aux_loss]
    assert len(calls) == 5
    assert_match(got, want, (q, k, v, x, layer.router.weight, layer.experts.w1))
