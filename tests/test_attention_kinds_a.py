"""local (dilation, global tokens), linear and axial attention, and axial position embeddings,
against explicit-mask O(L^2) references or per-token loops written from the papers, in float64."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from attention_memory import forward_backward_memory
from conftest import read_metrics, run_cli, tiny_overrides
from megalong.attention.alibi import alibi_slopes
from megalong.attention.axial import AxialAttention
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.linear import LinearAttention
from megalong.attention.local import LocalAttention
from megalong.attention.reference import causal_mask, explicit_mask, reference_attention
from megalong.config import ConfigError, config_from_dict, validate

TOL = 1e-9
D = 8  # head dim


def _config(heads: int) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, kv_channels=D, hidden_size=heads * D, attention_dropout=0.0)


def _tp(rank: int, size: int) -> SimpleNamespace:
    return SimpleNamespace(tp=SimpleNamespace(rank=lambda: rank, size=lambda: size))


def _qkv(L: int, heads: int, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, batch, heads, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]


def _bhld(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def _sbh(x: torch.Tensor) -> torch.Tensor:  # [b, h, L, d] -> megatron's [L, b, h * d]
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1)


def _ref(q, k, v, mask, scale, bias=None):
    return _sbh(reference_attention(_bhld(q), _bhld(k), _bhld(v), mask, scale, bias))


def _assert_close(out, ref, inputs, tol=TOL):
    assert (out - ref).abs().max().item() < tol
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert (a - b).abs().max().item() < tol


def _alibi(heads: int, L: int, distance=lambda i, j: i - j) -> torch.Tensor:
    """[1, heads, L, L] bias -slope_h * distance(i, j), element by element."""
    slopes = alibi_slopes(heads)
    return torch.tensor([[[-float(s) * distance(i, j) for j in range(L)] for i in range(L)] for s in slopes],
                        dtype=torch.float64).unsqueeze(0)


# ------------------------------------------------------------------------------------------------
# local: dilation and global tokens
# ------------------------------------------------------------------------------------------------

def _dilated_masks(L, window, dilations):
    return torch.stack([explicit_mask(L, lambda i, j, d=d: j <= i and (i - j) % d == 0 and (i - j) // d < window)
                        for d in dilations])


@pytest.mark.parametrize("L,window,dilation,alibi", [
    (13, 3, [1, 2, 3, 1], False), (16, 4, 2, False), (17, 2, [3, 1, 2, 5], True), (9, 4, [1, 1, 2, 2], True)])
def test_local_dilation_equals_explicit_mask(L, window, dilation, alibi):
    heads = 4
    q, k, v = _qkv(L, heads)
    module = LocalAttention(_config(heads), 1, window=window, dilation=dilation, alibi=alibi)
    dilations = dilation if isinstance(dilation, list) else [dilation] * heads
    bias = _alibi(heads, L) if alibi else None
    _assert_close(module(q, k, v), _ref(q, k, v, _dilated_masks(L, window, dilations), module.scale, bias), (q, k, v))


def _global_token_reference(q, k, v, qg, kg, vg, L, window, dilations, globals_, scale, bias):
    """Longformer: a global row is causal attention with the global projections; any other row sees
    its (dilated) window and the global tokens before it, with the ordinary projections."""
    local_masks = torch.stack([explicit_mask(L, lambda i, j, d=d: j <= i and (
        ((i - j) % d == 0 and (i - j) // d < window) or j in globals_)) for d in dilations])
    local = _ref(q, k, v, local_masks, scale, bias)
    full = _ref(qg, kg, vg, causal_mask(L), scale, bias)
    is_global = torch.tensor([i in globals_ for i in range(L)]).view(L, 1, 1)
    return torch.where(is_global, full, local)


@pytest.mark.parametrize("L,window,dilation,global_tokens,alibi", [
    (11, 3, 1, 2, False), (12, 2, [1, 2], [0, 5, 6], False), (13, 3, [2, 1], [1, 12], True), (6, 2, 1, [3, 9], False)])
def test_local_global_tokens_equal_explicit_reference(L, window, dilation, global_tokens, alibi):
    heads = 2
    q, k, v = _qkv(L, heads)
    qg, kg, vg = _qkv(L, heads, seed=1)
    module = LocalAttention(_config(heads), 1, window=window, dilation=dilation, global_tokens=global_tokens,
                            alibi=alibi)
    globals_ = set(range(global_tokens)) if isinstance(global_tokens, int) else set(global_tokens)
    dilations = dilation if isinstance(dilation, list) else [dilation] * heads
    out = module(torch.cat([q, qg], 2), torch.cat([k, kg], 2), torch.cat([v, vg], 2))
    ref = _global_token_reference(q, k, v, qg, kg, vg, L, window, dilations, globals_, module.scale,
                                  _alibi(heads, L) if alibi else None)
    _assert_close(out, ref, (q, k, v, qg, kg, vg))


def test_local_with_window_at_least_length_equals_global():
    q, k, v = _qkv(10, 2)
    full = GlobalAttention(_config(2), 1)(q, k, v)
    assert (LocalAttention(_config(2), 1, window=10)(q, k, v) - full).abs().max().item() < 1e-12
    # Global tokens whose projections equal the local ones (as initialised) change nothing then.
    with_globals = LocalAttention(_config(2), 1, window=12, global_tokens=[0, 4])
    cat = [torch.cat([x, x], 2) for x in (q, k, v)]
    assert (with_globals(*cat) - full).abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------

def _phi(x):
    return torch.nn.functional.elu(x) + 1


def _linear_loop(q, k, v, eps):
    """Katharopoulos et al. eq. (8)-(9) token by token, on [b, h, L, d]."""
    outs = []
    for i in range(q.shape[2]):
        S = sum(_phi(k[:, :, j]).unsqueeze(-1) * v[:, :, j].unsqueeze(-2) for j in range(i + 1))
        z = sum(_phi(k[:, :, j]) for j in range(i + 1))
        num = (_phi(q[:, :, i]).unsqueeze(-1) * S).sum(-2)
        outs.append(num / ((_phi(q[:, :, i]) * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2)


def _efficient_loop(q, k, v):
    """Shen et al. made causal, token by token: softmax over features for q, over positions <= i
    for k (plain exponentials, no stabiliser)."""
    outs = []
    for i in range(q.shape[2]):
        weights = torch.softmax(k[:, :, :i + 1], dim=2)  # [b, h, i+1, d]: each feature over positions
        context = torch.einsum("bhjf,bhje->bhfe", weights, v[:, :, :i + 1])
        outs.append(torch.einsum("bhf,bhfe->bhe", torch.softmax(q[:, :, i], dim=-1), context))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("normalization", ["elu", "efficient"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_linear_equals_per_token_loop(normalization, chunk_size):
    L, heads = 10, 3
    q, k, v = _qkv(L, heads)
    module = LinearAttention(_config(heads), 1, normalization=normalization, chunk_size=chunk_size, eps=1e-3)
    b = [_bhld(x) for x in (q, k, v)]
    ref = _sbh(_linear_loop(*b, 1e-3) if normalization == "elu" else _efficient_loop(*b))
    _assert_close(module(q, k, v), ref, (q, k, v))


@pytest.mark.parametrize("normalization", ["elu", "efficient"])
def test_linear_recurrent_form_equals_parallel_form(normalization):
    L, heads = 9, 2
    q, k, v = _qkv(L, heads)
    module = LinearAttention(_config(heads), 1, normalization=normalization, chunk_size=4)
    parallel = module(q, k, v).view(L, 2, heads, D)
    state = module.init_state(2, heads, D, q.device, q.dtype)
    for i in range(L):
        out, state = module.step(*(_bhld(x[i:i + 1]) for x in (q, k, v)), state)
        assert out.shape == (2, heads, 1, D)
        assert (out[:, :, 0] - parallel[i]).abs().max().item() < 1e-12
    # Large keys: the running maximum keeps `efficient` finite where exp(k) alone overflows (token
    # by token; in chunks, keys of one feature must stay within ~700 of each other in float64).
    if normalization == "efficient":
        big = LinearAttention(_config(heads), 1, normalization="efficient", chunk_size=1)
        out = big(q.detach() * 300, k.detach() * 300, v.detach())
        assert torch.isfinite(out).all()
        assert torch.isinf(torch.exp(k.detach() * 300)).any()


def test_linear_refuses_alibi():
    with pytest.raises(ValueError, match="ALiBi"):
        LinearAttention(_config(2), 1, alibi=True)


# ------------------------------------------------------------------------------------------------
# axial
# ------------------------------------------------------------------------------------------------

def _axial_loop(q, k, v, cols, scale, slopes=None):
    """The scheme of axial.py, token by token on [b, h, L, d]: row summaries u over whole rows,
    then one softmax over the row prefix (k, v) and the previous rows' same column (k, u)."""
    b, h, L, d = q.shape
    sl = torch.zeros(h, dtype=q.dtype) if slopes is None else slopes.to(q.dtype)

    def dot(i, j):
        return (q[:, :, i] * k[:, :, j]).sum(-1) * scale  # [b, h]

    def summary(p):  # unmasked attention of p over its whole row (positions < L)
        start = p // cols * cols
        keys = range(start, min(start + cols, L))
        w = torch.softmax(torch.stack([dot(p, j) - sl * abs(p - j) for j in keys], -1), -1)
        return sum(w[..., n, None] * v[:, :, j] for n, j in enumerate(keys))

    outs = []
    for p in range(L):
        r, c = divmod(p, cols)
        keys = [(j, v[:, :, j]) for j in range(r * cols, p + 1)]
        keys += [(rr * cols + c, summary(rr * cols + c)) for rr in range(r)]
        w = torch.softmax(torch.stack([dot(p, j) - sl * (p - j) for j, _ in keys], -1), -1)
        outs.append(sum(w[..., n, None] * val for n, (_, val) in enumerate(keys)))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("L,shape,alibi", [(12, [3, 4], False), (12, [4, 3], True), (10, [3, 4], True),
                                           (15, [3, 4], False), (6, [1, 6], False), (5, [5, 1], True)])
def test_axial_equals_per_token_loop(L, shape, alibi):
    heads = 4
    q, k, v = _qkv(L, heads)
    module = AxialAttention(_config(heads), 1, axial_shape=shape, alibi=alibi)
    ref = _sbh(_axial_loop(*(_bhld(x) for x in (q, k, v)), shape[1], module.scale,
                           alibi_slopes(heads) if alibi else None))
    _assert_close(module(q, k, v), ref, (q, k, v))


# ------------------------------------------------------------------------------------------------
# every kind: causal (no output depends on a later token), and every earlier token reaches it
# ------------------------------------------------------------------------------------------------

KINDS = {
    "local_dilated_global": lambda heads, **kw: LocalAttention(_config(heads), 1, window=3, dilation=[1, 2, 3, 1],
                                                               global_tokens=[0, 2], **kw),
    "linear_elu": lambda heads, **kw: LinearAttention(_config(heads), 1, chunk_size=4, **kw),
    "linear_efficient": lambda heads, **kw: LinearAttention(_config(heads), 1, normalization="efficient",
                                                            chunk_size=4, **kw),
    "axial": lambda heads, **kw: AxialAttention(_config(heads), 1, axial_shape=[4, 4], **kw),
}


def _inputs(kind, L, heads, seed=0):
    q, k, v = _qkv(L, heads, seed=seed)
    if kind.startswith("local"):  # local heads, then the global-projection heads
        qg, kg, vg = _qkv(L, heads, seed=seed + 7)
        return [torch.cat([a, b], 2).detach().requires_grad_() for a, b in ((q, qg), (k, kg), (v, vg))]
    return q, k, v


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_output_depends_on_a_later_token(kind):
    L, heads = 16, 4
    module = KINDS[kind](heads)
    q, k, v = _inputs(kind, L, heads)
    out = module(q, k, v)
    for t in (0, 5, 10, 15):
        grads = torch.autograd.grad(out[t].sum(), (q, k, v), retain_graph=True)
        for g in grads:
            assert not g[t + 1:].any(), (kind, t)
        # values reach the output from every earlier token where the kind promises it
        if kind in ("linear_elu", "linear_efficient", "axial"):
            assert (grads[2][:t + 1].abs().sum(dim=(1, 3)) > 0).all(), (kind, t)
    # and changing later tokens leaves earlier outputs as they are
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[9:] = torch.randn_like(x[9:])
    assert (module(q2, k2, v2)[:9] - out[:9]).abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------------
# tensor parallelism: each rank's heads, by global head index, compute what one process computes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["local_dilated_global", "axial", "linear_elu", "linear_efficient"])
def test_head_split_over_two_ranks_equals_one(kind):
    L, heads = 16, 4
    alibi = {"alibi": True} if kind in ("local_dilated_global", "axial") else {}
    q, k, v = _inputs(kind, L, heads)
    full = KINDS[kind](heads, **alibi)(q, k, v)
    halves = []
    for rank in range(2):
        module = KINDS[kind](heads, pg_collection=_tp(rank, 2), **alibi)
        assert module.first_head == 2 * rank
        if kind.startswith("local"):  # local heads 2r, 2r+1 and their global-projection heads
            sl = [2 * rank, 2 * rank + 1, heads + 2 * rank, heads + 2 * rank + 1]
        else:
            sl = [2 * rank, 2 * rank + 1]
        halves.append(module(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
    assert (torch.cat(halves, dim=-1) - full).abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------------
# cost: memory linear in L, never an L x L tensor
# ------------------------------------------------------------------------------------------------

SUBQUADRATIC = {
    "local": lambda: LocalAttention(_config(2), 1, window=16, dilation=[1, 3], global_tokens=[0, 1], alibi=True),
    "linear": lambda: LinearAttention(_config(2), 1, chunk_size=16),
    "linear_efficient": lambda: LinearAttention(_config(2), 1, normalization="efficient", chunk_size=32),
}


def _run_kind(name, L):
    if name == "axial":  # square-ish grids: L = 16 x 16 and 32 x 32 -> L * (rows + cols) grows 8x
        side = int(math.isqrt(L))
        module = AxialAttention(_config(2), 1, axial_shape=[side, side], alibi=True)
    elif name == "global":
        module = GlobalAttention(_config(2), 1, alibi=True)  # an explicit L x L bias
    else:
        module = SUBQUADRATIC[name]()
    if name == "local":
        return forward_backward_memory(lambda q, k, v: module(*(torch.cat([x, x], 2) for x in (q, k, v))), L)
    return forward_backward_memory(module, L)


@pytest.mark.parametrize("name", ["local", "linear", "linear_efficient"])
def test_memory_grows_linearly(name):
    small, large = _run_kind(name, 256), _run_kind(name, 1024)
    assert large.peak <= 4.5 * small.peak, (name, small.peak, large.peak)
    assert large.largest < 1024 * 1024 / 4, (name, large.largest_shape)  # nothing near L x L


def test_memory_axial_and_global():
    """axial costs L * (rows + cols): 4x the length on a square grid is 8x, not 16x; global's
    explicit L x L bias grows 16x."""
    axial = [_run_kind("axial", L) for L in (256, 1024)]
    glob = [_run_kind("global", L) for L in (256, 1024)]
    assert axial[1].peak <= 8.5 * axial[0].peak
    assert axial[1].largest < 1024 * 1024 / 4, axial[1].largest_shape  # 2 heads x L x (rows + cols)
    assert glob[1].peak >= 12 * glob[0].peak
    assert glob[1].largest >= 1024 * 1024


def test_axial_memory_with_fixed_columns_grows_linearly():
    """With the number of columns fixed and rows few beside it, L * (rows + cols) is about L * cols:
    linear in L (cols = 128: 2 then 8 rows)."""
    def run(L):
        module = AxialAttention(_config(2), 1, axial_shape=[L // 128, 128])
        return forward_backward_memory(module, L)
    small, large = run(256), run(1024)
    assert large.peak <= 4.5 * small.peak, (small.peak, large.peak)


# ------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------

def _model(**model):
    base = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 16,
            "attention_layers": ["global"]}
    cfg = config_from_dict({"model": {**base, **model}})
    validate(cfg, check_paths=False)
    return cfg


@pytest.mark.parametrize("model,message", [
    ({"attention_layers": ["local"], "attention": {"local": {"dilation": [1, 2]}}},
     r"model.attention.local.dilation: a list needs one entry per attention head: got 2 for 4 heads"),
    ({"attention_layers": ["local"], "attention": {"local": {"dilation": 0}}}, r"model.attention.local.dilation"),
    ({"attention_layers": ["local"], "attention": {"local": {"global_tokens": [3, 16]}}},
     r"model.attention.local.global_tokens: positions must be integers in \[0, 16\)"),
    ({"attention_layers": ["local"], "attention": {"local": {"global_tokens": 17}}}, r"model.attention.local.global_tokens"),
    ({"attention_layers": ["local"], "attention": {"local": {"window": 0}}}, r"model.attention.local.window"),
    ({"attention_layers": ["axial"], "attention": {"axial": {"axial_shape": [3, 4]}}},
     r"model.attention.axial.axial_shape: 3 x 4 = 12 is not the sequence length 16"),
    ({"attention_layers": ["axial"]}, r"model.attention.axial.axial_shape: expected \[rows, cols\]"),
    ({"attention_layers": ["linear"], "attention": {"linear": {"normalization": "softmax"}}},
     r"model.attention.linear.normalization: must be one of"),
    ({"attention_layers": ["linear"], "attention": {"linear": {"chunk_size": 0}}}, r"model.attention.linear.chunk_size"),
    ({"attention_layers": ["linear"], "alibi": True, "position_embedding": "none"}, r"model.alibi: 'linear'"),
    ({"position_embedding": "axial"}, r"model.axial_position.shape: expected \[rows, cols\]"),
    ({"position_embedding": "axial", "axial_position": {"shape": [3, 5]}},
     r"model.axial_position.shape: 3 x 5 positions are fewer than the sequence length 16"),
    ({"axial_position": {"shape": [4, 4]}}, r"model.axial_position: set, but model.position_embedding is 'learned'"),
    ({"position_embedding": "axial", "axial_position": {"shape": [4, 4], "mode": "stack"}},
     r"model.axial_position.mode: must be one of"),
])
def test_bad_options_fail_with_the_key_named(model, message):
    with pytest.raises(ConfigError, match=message):
        _model(**model)


def test_good_options_validate():
    cfg = _model(num_layers=3, attention_layers=["local", "linear", "axial"], position_embedding="axial",
                 axial_position={"shape": [4, 4], "mode": "concat"},
                 attention={"local": {"window": 4, "dilation": [1, 2, 1, 2], "global_tokens": [0, 8]},
                            "linear": {"normalization": "efficient"}, "axial": {"axial_shape": [2, 8]}})
    assert cfg.attention_options("local").global_positions() == [0, 8]


@pytest.mark.parametrize("local", [{"dilation": 2}, {"dilation": [1, 1, 2, 1]}, {"global_tokens": 1}])
def test_gpt_neo_export_refuses_dilated_or_global_local_layers(local):
    from megalong.export.gpt_neo import gpt_neo_refusal

    plain = dict(num_layers=2, attention_layers=["global", "local"], scale_attention=False, qkv_bias=False)
    assert gpt_neo_refusal(_model(**plain, attention={"local": {"window": 4}})) is None
    assert "model.attention.local" in gpt_neo_refusal(_model(**plain, attention={"local": {"window": 4, **local}}))


def test_flop_count_uses_each_kind_s_keys():
    from megalong.model.gpt import attended_keys

    cfg = _model(num_layers=4, attention_layers=["global", "local", "linear", "axial"],
                 attention={"local": {"window": 4, "global_tokens": 2}, "axial": {"axial_shape": [2, 8]}})
    assert [attended_keys(cfg, k) for k in cfg.layer_kinds()] == [8.5, 6, 8, 8 + 5]


# ------------------------------------------------------------------------------------------------
# axial position embeddings and the model
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


def test_model_with_axial_positions_and_global_tokens():
    """Built from the config: axial positions are added to the word embeddings, and a local layer
    with global tokens gets Longformer's global projections, initialised as copies of the local."""
    from megalong.model.gpt import build_model, position_ids_for
    from megalong.parallel.distributed import initialize, shutdown

    initialize(1)
    try:
        cfg = _model(num_layers=2, attention_layers=["local", "axial"], position_embedding="axial",
                     axial_position={"shape": [4, 4]},
                     attention={"local": {"window": 3, "global_tokens": 2}, "axial": {"axial_shape": [4, 4]}})
        torch.manual_seed(0)
        model = build_model(cfg, 50)
        attn = model.decoder.layers[0].self_attention
        assert torch.equal(attn.linear_qkv_global.weight, attn.linear_qkv.weight)
        assert not hasattr(model.decoder.layers[1].self_attention, "linear_qkv_global")
        tokens = torch.randint(0, 50, (2, 16))
        loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
        loss.backward()
        emb = model.embedding.position_embeddings
        assert emb.row_embeddings.grad.abs().sum() > 0 and emb.col_embeddings.grad.abs().sum() > 0
        assert attn.linear_qkv_global.weight.grad.abs().sum() > 0
        word = model.embedding.word_embeddings(tokens)
        want = (word + emb(position_ids_for(tokens))).transpose(0, 1)
        assert torch.allclose(model.embedding(tokens, position_ids_for(tokens)), want)
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------
# end to end: a model mixing the kinds trains through the CLI, and TP=2 gives the TP=1 losses
# ------------------------------------------------------------------------------------------------

MIXED = {
    "model.num_layers": 4,
    "model.attention_layers": '[[["global", "local", "linear", "axial"], 1]]',
    "model.attention": "{local: {window: 8, dilation: [1, 2, 1, 3], global_tokens: [0, 1]}, "
                       "linear: {chunk_size: 16}, axial: {axial_shape: [8, 8]}}",
    "model.position_embedding": "axial",
    "model.axial_position": "{shape: [8, 8], mode: sum}",
    "train.micro_batch_size": 1,
}
STEPS = 4


def test_mixed_kinds_train_and_tp2_matches_one_process(tiny_data, tmp_path):
    run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "single", STEPS, **MIXED)])
    single = read_metrics(tmp_path / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    assert single[STEPS] < single[1]
    run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "tp2", STEPS, **MIXED, **{"parallel.tensor": 2})],
            nproc=2)
    tp2 = read_metrics(tmp_path / "tp2")
    for step in single:
        assert abs(tp2[step] - single[step]) < 2e-5, (step, tp2[step], single[step])
