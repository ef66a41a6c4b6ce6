"""`lsh` (Reformer) and `fam` (TransformerFAM) against naive references that follow the papers,
in float64, forward and gradients; ALiBi in both; TP=2 against TP=1; memory linear in L; training
steps through the CLI; config validation."""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megalong.attention.alibi import alibi_slopes
from megalong.attention.fam import FamAttention
from megalong.attention.lsh import LshAttention
from megalong.attention.reference import explicit_mask, reference_attention

TOL = 1e-9
REPO = Path(__file__).resolve().parents[1]


def _config(heads, head_dim=8):
    return SimpleNamespace(num_attention_heads=heads, kv_channels=head_dim, hidden_size=heads * head_dim,
                           attention_dropout=0.0)


def _tp(rank, size):
    return SimpleNamespace(tp=SimpleNamespace(rank=lambda: rank, size=lambda: size))


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()


def _assert_close_with_grads(out, ref, inputs, tol=TOL):
    assert (out - ref).abs().max().item() < tol
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, grad, retain_graph=True)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < tol


# ---------------------------------------------------------------------------------------------
# lsh
# ---------------------------------------------------------------------------------------------


def naive_lsh(q, v, module, slopes=None):
    """Reformer's multi-round LSH attention written out: per round, hashes from the module's
    rotations, a Python sort by (bucket, position), the L x L mask of 'same chunk or the chunk
    before, not later in the text', the paper's self penalty (1e5) and duplicate count log N_ij;
    rounds combined by softmax over their log-sum-exps. Returns the output and the round masks."""
    b, h, L, d = q.shape
    c, n = module.bucket_size, module.n_hashes
    chunks = -(-L // c)
    n_buckets = module.n_buckets or (1 if chunks == 1 else chunks + chunks % 2)
    k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    rotations = module.rotations(n_buckets, d) if n_buckets > 1 else None
    out = torch.zeros_like(q)
    all_masks = []
    for bi in range(b):
        for hi in range(h):
            masks = []
            for r in range(n):
                if n_buckets == 1:
                    buckets = [0] * L
                else:
                    x = q[bi, hi] @ rotations[hi, r]
                    buckets = [int(torch.argmax(torch.cat([x[i], -x[i]]))) for i in range(L)]
                order = sorted(range(L), key=lambda i: (buckets[i], i))
                chunk = {token: place // c for place, token in enumerate(order)}
                masks.append(explicit_mask(L, lambda i, j: j <= i and chunk[j] in (chunk[i], chunk[i] - 1)))
            times = sum(m.double() for m in masks)
            scores = q[bi, hi] @ k[bi, hi].T * module.scale
            if slopes is not None:
                scores = scores + torch.tensor([[-float(slopes[hi]) * (i - j) for j in range(L)]
                                                for i in range(L)], dtype=q.dtype)
            scores = scores - torch.log(times.clamp(min=1))
            scores = torch.where(torch.eye(L, dtype=torch.bool), scores - 1e5, scores)
            lses, outs = [], []
            for m in masks:
                s = scores.masked_fill(~m, float("-inf"))
                lses.append(torch.logsumexp(s, -1))
                outs.append(torch.softmax(s, -1) @ v[bi, hi])
            weights = torch.softmax(torch.stack(lses), 0).unsqueeze(-1)
            out[bi, hi] = (weights * torch.stack(outs)).sum(0)
            all_masks.append(masks)
    return out, all_masks


@pytest.mark.parametrize("L,bucket,n_hashes,alibi,heads,n_buckets", [
    (16, 4, 1, False, 2, None), (16, 4, 2, False, 2, None), (16, 4, 3, True, 4, None),
    (12, 3, 2, False, 2, None), (24, 4, 4, True, 3, None), (10, 4, 2, False, 2, None),  # 10: padded
    (16, 4, 2, False, 2, 2), (12, 4, 2, True, 2, 6), (10, 4, 2, False, 2, 8)])  # n_buckets fixed
def test_lsh_equals_naive_reference(L, bucket, n_hashes, alibi, heads, n_buckets):
    module = LshAttention(_config(heads), 3, n_hashes=n_hashes, bucket_size=bucket, seed=7, alibi=alibi,
                          n_buckets=n_buckets).double()
    q, v = _randn(2, heads, L, 8, seed=1), _randn(2, heads, L, 8, seed=2)
    out = module.attend(q, q, v)
    ref, masks = naive_lsh(q, v, module, alibi_slopes(heads) if alibi else None)
    _assert_close_with_grads(out, ref, (q, v))
    # The rounds really differ (else n_hashes would be a no-op) and restrict attention (not O(L^2)).
    union = torch.stack([torch.stack(m).any(0) for m in masks])
    if n_hashes > 1:
        assert any(not torch.equal(m[0], m[1]) for m in masks)
    assert union.sum() < union.shape[0] * L * (L + 1) // 2  # some earlier tokens are not seen
    # Duplicates counted once: the result is the softmax over the union of the rounds' keys.
    if not alibi:
        k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        for idx in range(union.shape[0]):
            bi, hi = divmod(idx, heads)
            mask = union[idx] & ~torch.eye(L, dtype=torch.bool)
            mask[mask.sum(-1) == 0] |= torch.eye(L, dtype=torch.bool)[mask.sum(-1) == 0]
            want = reference_attention(q[bi, hi], k[bi, hi], v[bi, hi], mask, module.scale)
            assert (out[bi, hi] - want).abs().max().item() < TOL


@pytest.mark.parametrize("alibi", [False, True])
def test_lsh_with_one_bucket_is_causal_attention_with_self_penalty(alibi):
    L, heads = 9, 4
    module = LshAttention(_config(heads), 1, n_hashes=2, bucket_size=L, alibi=alibi).double()
    q, v = _randn(1, heads, L, 8, seed=3), _randn(1, heads, L, 8, seed=4)
    k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    # A token sees every earlier token but not itself; the first token sees only itself.
    mask = explicit_mask(L, lambda i, j: j < i or i == j == 0)
    bias = None
    if alibi:
        slopes = alibi_slopes(heads)
        bias = torch.tensor([[[-float(s) * (i - j) for j in range(L)] for i in range(L)] for s in slopes],
                            dtype=torch.float64).unsqueeze(0)
    ref = reference_attention(q, k, v, mask, module.scale, bias)
    _assert_close_with_grads(module.attend(q, q, v), ref, (q, v))


def test_lsh_fixed_n_buckets_hashes_a_token_alike_at_every_length():
    """With n_buckets set, a token's buckets do not depend on the sequence length (training at 16,
    generating or evaluating at 8 or 24); without it they are the chunk count's and do."""
    heads = 2
    q = _randn(1, heads, 24, 8, seed=8)
    fixed = LshAttention(_config(heads), 1, n_hashes=2, bucket_size=4, seed=5, n_buckets=4).double()
    by_length = LshAttention(_config(heads), 1, n_hashes=2, bucket_size=4, seed=5).double()
    for L in (8, 16, 24):
        assert fixed.buckets_for(L) == 4
        assert torch.equal(fixed.hash(q[:, :, :L], fixed.buckets_for(L)),
                           fixed.hash(q, fixed.buckets_for(24))[..., :L])
    assert [by_length.buckets_for(L) for L in (8, 16, 24)] == [2, 4, 6]
    assert not torch.equal(by_length.hash(q[:, :, :8], by_length.buckets_for(8)),
                           by_length.hash(q, by_length.buckets_for(24))[..., :8])
    # At the length it was fixed from, the option changes nothing.
    v = _randn(1, heads, 16, 8, seed=9)
    assert torch.equal(fixed.attend(q[:, :, :16], None, v), by_length.attend(q[:, :, :16], None, v))


def test_lsh_rotations_are_reproducible_and_follow_the_global_head():
    heads, L = 4, 16
    q, v = _randn(1, heads, L, 8, seed=5), _randn(1, heads, L, 8, seed=6)
    full = LshAttention(_config(heads), 2, n_hashes=2, bucket_size=4, seed=1).double()
    again = LshAttention(_config(heads), 2, n_hashes=2, bucket_size=4, seed=1).double()
    out = full.attend(q, q, v)
    assert torch.equal(out, again.attend(q, q, v)) and torch.equal(out, full.attend(q, q, v))
    other_seed = LshAttention(_config(heads), 2, n_hashes=2, bucket_size=4, seed=2).double()
    other_layer = LshAttention(_config(heads), 3, n_hashes=2, bucket_size=4, seed=1).double()
    assert not torch.equal(full.rotations(4, 8), other_seed.rotations(4, 8))
    assert not torch.equal(full.rotations(4, 8), other_layer.rotations(4, 8))
    halves = []
    for rank in range(2):
        part = LshAttention(_config(heads), 2, n_hashes=2, bucket_size=4, seed=1,
                            pg_collection=_tp(rank, 2)).double()
        assert torch.equal(part.rotations(4, 8), full.rotations(4, 8)[2 * rank: 2 * rank + 2])
        halves.append(part.attend(q[:, 2 * rank: 2 * rank + 2], None, v[:, 2 * rank: 2 * rank + 2]))
    assert torch.equal(torch.cat(halves, dim=1), out)


# ---------------------------------------------------------------------------------------------
# fam
# ---------------------------------------------------------------------------------------------


def _fam_layer_parts(layer):
    """The megatron FAM layer's weights as plain functions, for the per-block reference."""
    attn = layer.self_attention
    heads, d = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head

    def qkv(h):
        s, b, _ = h.shape
        return F.linear(layer.input_layernorm(h), attn.linear_qkv.weight).view(s, b, heads, 3, d).unbind(3)

    def proj(ctx):
        return F.linear(ctx, attn.linear_proj.weight, attn.linear_proj.bias)

    def mlp(h):
        h = layer.pre_mlp_layernorm(h)
        h = F.gelu(F.linear(h, layer.mlp.linear_fc1.weight, layer.mlp.linear_fc1.bias), approximate="tanh")
        return F.linear(h, layer.mlp.linear_fc2.weight, layer.mlp.linear_fc2.bias)

    return qkv, proj, mlp


def naive_fam_layer(x, fam0, qkv, proj, mlp, block, memory, scale, slopes=None):
    """TransformerFAM's layer as a loop over blocks: for block t the queries are [FAM; block] and
    the keys [memory blocks; FAM; block], with an explicit mask (block tokens: memory, FAM, own
    block causally; FAM: FAM and the whole block) and ALiBi distances from explicit positions (FAM
    keys at t*block - 1, FAM queries at (t+1)*block - 1); the result passes the residual and the
    MLP; the FAM part goes on to the next block."""
    s, b, _ = x.shape
    fam = fam0.unsqueeze(1).expand(-1, b, -1) if fam0 is not None else x[:0]
    nf = fam.shape[0]
    outs = []
    for t in range(-(-s // block)):
        start, end = t * block, min((t + 1) * block, s)
        first = max(0, start - memory * block)
        tokens = torch.cat([x[first:start], fam, x[start:end]])
        key_pos = list(range(first, start)) + [start - 1] * nf + list(range(start, end))
        key_kind = ["mem"] * (start - first) + ["fam"] * nf + ["own"] * (end - start)
        q, k, v = (u.permute(1, 2, 0, 3) for u in qkv(tokens))
        queries = list(range(start - first, len(key_pos)))  # FAM and block tokens
        query_pos = [start + block - 1 if key_kind[i] == "fam" else key_pos[i] for i in queries]

        def visible(qi, kj):
            if key_kind[queries[qi]] == "fam":
                return key_kind[kj] in ("fam", "own")
            return key_kind[kj] in ("mem", "fam") or key_pos[kj] <= query_pos[qi]

        mask = torch.tensor([[visible(i, j) for j in range(len(key_pos))] for i in range(len(queries))])
        bias = None
        if slopes is not None:
            bias = torch.tensor([[[-float(sl) * (qp - kp) for kp in key_pos] for qp in query_pos]
                                 for sl in slopes], dtype=x.dtype)
        ctx = reference_attention(q[:, :, queries], k, v, mask, scale, bias)
        h = tokens[start - first:] + proj(ctx.permute(2, 0, 1, 3).flatten(2))
        h = h + mlp(h)
        fam, out = h[:nf], h[nf:]
        outs.append(out)
    return torch.cat(outs)


@pytest.fixture
def one_process():
    from megalong.parallel.distributed import initialize, shutdown

    initialize(1)
    yield
    shutdown()


def _model(attention_layers, attention, seq=24, heads=4, alibi=False, layers=1, tensor=1, **model):
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model

    cfg = config_from_dict({"model": {
        "num_layers": layers, "hidden_size": 8 * heads, "num_attention_heads": heads,
        "max_position_embeddings": seq, "attention_layers": attention_layers, "attention": attention,
        "alibi": alibi, "position_embedding": "none" if alibi else "learned", **model},
        "parallel": {"tensor": tensor}})
    validate(cfg, check_paths=False, world_size=tensor)
    torch.manual_seed(0)
    return build_model(cfg, 64).double()


@pytest.mark.parametrize("L,block,memory,fam,alibi,heads", [
    (24, 8, 1, 3, False, 4), (24, 6, 2, 2, True, 12), (24, 8, 0, 4, False, 4), (24, 8, 1, 0, True, 4),
    (21, 8, 1, 3, True, 4)])  # 21: a short last block (the layer itself accepts any length)
def test_fam_layer_equals_per_block_loop(one_process, L, block, memory, fam, alibi, heads):
    model = _model(["fam"], {"fam": {"block_size": block, "memory_segments": memory, "fam_length": fam}},
                   heads=heads, alibi=alibi)
    layer = model.decoder.layers[0]
    x = _randn(L, 2, 8 * heads, seed=8)
    out, _ = layer(x)
    qkv, proj, mlp = _fam_layer_parts(layer)
    ref = naive_fam_layer(x, layer.fam_init, qkv, proj, mlp, block, memory,
                          layer.self_attention.core_attention.scale, alibi_slopes(heads) if alibi else None)
    params = [x, layer.self_attention.linear_qkv.weight, layer.mlp.linear_fc1.weight]
    if fam:
        params.append(layer.fam_init)
    _assert_close_with_grads(out, ref, params)


def test_fam_one_block_no_memory_is_causal_attention_over_fam_and_block():
    heads, B, Fl = 4, 7, 3
    attn = FamAttention(_config(heads), 1, block_size=B, memory_segments=0, fam_length=Fl).double()
    q, k, v = (_randn(2, heads, B, 8, seed=i) for i in (10, 11, 12))
    qf, kf, vf = (_randn(2, heads, Fl, 8, seed=i) for i in (13, 14, 15))
    block_out = attn.blocks(q, k, v, kf.unsqueeze(2), vf.unsqueeze(2))
    fam_out = attn.fam_step(qf, kf, vf, k, v)
    # Causal attention over the sequence [FAM; block], whose FAM rows see the whole block.
    Q, K, V = (torch.cat(p, dim=2) for p in ((qf, q), (kf, k), (vf, v)))
    mask = explicit_mask(Fl + B, lambda i, j: i < Fl or j <= i)
    ref = reference_attention(Q, K, V, mask, attn.scale)
    _assert_close_with_grads(torch.cat([fam_out, block_out], dim=2), ref, (q, k, v, qf, kf, vf))


def test_fam_passes_fam_across_blocks_and_memory_gradients(one_process):
    """Block 3's output depends on block 0 only through the FAM chain (memory 1 block back)."""
    model = _model(["fam"], {"fam": {"block_size": 6, "memory_segments": 1, "fam_length": 2}})
    layer = model.decoder.layers[0]
    x = _randn(24, 1, 32, seed=9)
    out, _ = layer(x)
    grad = torch.autograd.grad(out[18:].sum(), x)[0]
    assert grad[:6].abs().sum() > 0  # through FAM
    assert grad[6:12].abs().sum() > 0  # through FAM (block 1 is beyond the memory of block 3)
    model_no_fam = _model(["fam"], {"fam": {"block_size": 6, "memory_segments": 1, "fam_length": 0}})
    out, _ = model_no_fam.decoder.layers[0](x)
    grad = torch.autograd.grad(out[18:].sum(), x)[0]
    assert grad[:12].abs().sum() == 0 and grad[12:18].abs().sum() > 0  # memory only


# ---------------------------------------------------------------------------------------------
# Model, config, memory
# ---------------------------------------------------------------------------------------------


def test_lsh_self_attention_projects_no_keys(one_process):
    model = _model(["lsh", "fam"], {"lsh": {"bucket_size": 4}, "fam": {"block_size": 8, "fam_length": 2}},
                   layers=2)
    names = dict(model.named_parameters())
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 32)  # q and v only
    assert names["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (96, 32)
    assert names["decoder.layers.1.fam_init"].shape == (2, 32)


@pytest.mark.parametrize("kind,options,extra,key", [
    ("lsh", {"bucket_size": 5}, {}, "model.attention.lsh.bucket_size"),
    ("lsh", {"bucket_size": 32}, {}, "model.attention.lsh.bucket_size"),  # longer than the sequence
    ("lsh", {"bucket_size": 8}, {}, "model.attention.lsh.bucket_size"),  # 3 buckets: not even
    ("lsh", {"n_hashes": 0, "bucket_size": 4}, {}, "model.attention.lsh.n_hashes"),
    ("lsh", {"bucket_size": 4, "n_buckets": 3}, {}, "model.attention.lsh.n_buckets"),
    ("lsh", {"bucket_size": 4, "n_buckets": 0}, {}, "model.attention.lsh.n_buckets"),
    ("fam", {"block_size": 5}, {}, "model.attention.fam.block_size"),
    ("fam", {"block_size": 8, "memory_segments": 3}, {}, "model.attention.fam.memory_segments"),
    ("fam", {"block_size": 8, "memory_segments": -1}, {}, "model.attention.fam.memory_segments"),
    ("fam", {"block_size": 8, "fam_length": -1}, {}, "model.attention.fam.fam_length"),
    ("fam", {"block_size": 8}, {"position_embedding": "rope"}, "model.position_embedding"),
    ("fam", {"block_size": 8}, {"mlp_layers": ["moe"]}, "model.mlp_layers"),
    ("lsh", {"bukcet_size": 4}, {}, "model.attention.lsh.bukcet_size"),
])
def test_bad_options_name_the_key(kind, options, extra, key):
    from megalong.config import ConfigError, config_from_dict, validate

    with pytest.raises(ConfigError) as err:  # unknown keys at load, values in validate
        cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                          "max_position_embeddings": 24, "attention_layers": [kind],
                                          "attention": {kind: options}, **extra}})
        validate(cfg, check_paths=False)
    assert key in str(err.value)


def test_lsh_n_buckets_frees_the_chunk_count():
    """3 chunks (odd) are refused by bucket count alone, accepted once n_buckets fixes it."""
    from megalong.config import config_from_dict, validate

    cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "max_position_embeddings": 24, "attention_layers": ["lsh"],
                                      "attention": {"lsh": {"bucket_size": 8, "n_buckets": 4}}}})
    validate(cfg, check_paths=False)
    assert cfg.attention_options("lsh").n_buckets == 4


@pytest.mark.parametrize("kind", ["lsh", "fam"])
def test_memory_grows_linearly_and_no_length_squared_tensor(kind):
    from attention_memory import forward_backward_memory

    heads = 2
    if kind == "lsh":
        attention = LshAttention(_config(heads), 1, n_hashes=2, bucket_size=16, alibi=True)
    else:
        fam = FamAttention(_config(heads), 1, block_size=16, memory_segments=1, fam_length=4, alibi=True)

        def attention(q, k, v):  # block attention with FAM keys/values for every block
            L, b = q.shape[:2]
            kf, vf = (torch.ones(b, heads, -(-L // 16), 4, 8, requires_grad=True) for _ in range(2))
            out = fam.blocks(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), kf, vf)
            return out.permute(2, 0, 1, 3).flatten(2)

    small, large = (forward_backward_memory(attention, L, heads=heads) for L in (256, 1024))
    assert small.largest < 256 * 256 and large.largest < 1024 * 1024, (small.largest_shape, large.largest_shape)
    assert large.peak <= 4.5 * small.peak, (small.peak, large.peak)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (two gloo processes) and training through the CLI
# ---------------------------------------------------------------------------------------------

# 12 heads with ALiBi: each TP=2 rank holds 6 heads, whose rotations and slopes must be those of
# global heads 6r..6r+5; the FAM layer's feedback tokens pass row-parallel projections.
TP_MODEL = dict(attention_layers=["lsh", "fam", "global"], seq=16, heads=12, alibi=True, layers=3,
                attention={"lsh": {"bucket_size": 4, "n_hashes": 2, "seed": 3},
                           "fam": {"block_size": 4, "memory_segments": 1, "fam_length": 2}})


def _loss_and_grads(model):
    from megalong.model.gpt import position_ids_for

    tokens = torch.arange(32).view(2, 16) * 7 % 64
    loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _tp_worker(out: str) -> None:
    """Run under torch.distributed.run with 2 processes: TP=2 loss, merged weights and gradients."""
    import torch.distributed as dist

    from megalong.model.tp_shard import merge_tensor_parallel, partition_dims
    from megalong.parallel.distributed import initialize, shutdown

    initialize(2)
    model = _model(tensor=2, **TP_MODEL)
    loss, grads = _loss_and_grads(model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    gathered = [None, None]
    dist.all_gather_object(gathered, (weights, grads))
    if dist.get_rank() == 0:
        dims = partition_dims(model)
        torch.save({"loss": loss, "weights": merge_tensor_parallel([g[0] for g in gathered], dims),
                    "grads": merge_tensor_parallel([g[1] for g in gathered], dims)}, out)
    shutdown()


def test_tensor_parallel_2_equals_1(one_process, tmp_path):
    out = tmp_path / "tp2.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = torch.load(out)
    model = _model(**TP_MODEL)
    for name, param in model.named_parameters():  # the same seed gives the same model at any TP size
        assert torch.equal(param.detach(), tp2["weights"][name]), name
    loss, grads = _loss_and_grads(model)
    assert abs(loss - tp2["loss"]) < 1e-10
    # Relative bound: megatron's vocab-parallel cross-entropy backward leaves float32 rounding in
    # every gradient (seen: 4e-8 of the largest entry); a wrong head index moves them by percents.
    for name, grad in grads.items():
        assert (grad - tp2["grads"][name]).abs().max().item() <= 1e-6 * grad.abs().max().item(), name


def test_cli_trains_a_mixed_model(tiny_data, tmp_path):
    """Reformer's [local, lsh] mix and a FAM layer in one model, trained a few steps by the CLI."""
    from conftest import read_metrics, run_cli, tiny_overrides

    run_cli(["train", *tiny_overrides(tiny_data, tmp_path, 3, **{
        "model.attention_layers": '[[["local", "lsh", "fam", "local"], 1]]', "model.num_layers": 4,
        "model.attention": "{local: {window: 8}, lsh: {bucket_size: 8, n_hashes: 2}, "
                           "fam: {block_size: 16, memory_segments: 1, fam_length: 4}}",
        "model.alibi": "true", "model.position_embedding": "none"})])
    losses = read_metrics(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(x) for x in losses.values())
    assert losses[3] < losses[1]


if __name__ == "__main__":
    _tp_worker(sys.argv[1])
