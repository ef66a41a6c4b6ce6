"""Reversible layers, chunked feed-forward, megatron-core recompute: against plain stacks (float64)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalong.attention.registry import ATTENTION_KINDS
from megalong.config import ConfigError, ExecutionConfig, config_from_dict, validate
from megalong.model.chunked_ffn import ChunkedMLP
from megalong.model.gpt import build_model, position_ids_for
from megalong.model.reversible import ReversibleTransformerBlock, run_reversible
from megalong.moe.layer import moe_aux_loss
from megalong.parallel.distributed import initialize, shutdown

SEQ, BATCH, HIDDEN = 16, 2, 32
EXECUTION_KEYS = {f.name for f in dataclasses.fields(ExecutionConfig)}
KIND_OPTIONS = {"local": {"window": 4}, "lsh": {"bucket_size": 4, "n_hashes": 2}, "linear": {"chunk_size": 4},
                "axial": {"axial_shape": [4, 4]}, "fam": {"block_size": 4, "fam_length": 2}}
MOE = {"num_experts": 4, "top_k": 2, "router": "noisy_topk", "router_dtype": "fp64", "dropless": True,
       "capacity_factor": None}


@pytest.fixture
def one_process():
    initialize(1)
    yield
    shutdown()


def _cfg(kind: str = "global", layers: int = 3, moe: bool = True, **model):
    raw = {"num_layers": layers, "hidden_size": HIDDEN, "num_attention_heads": 4,
           "max_position_embeddings": SEQ, "attention_layers": [[[kind], layers]],
           "attention": {kind: KIND_OPTIONS[kind]} if kind in KIND_OPTIONS else {},
           "hidden_dropout": 0.1, "attention_dropout": 0.1, **model}
    if moe:  # the middle layer is MoE with noisy gating (randomness in the MLP half)
        raw["mlp_layers"] = ["dense"] * (layers // 2) + ["moe"] + ["dense"] * (layers - layers // 2 - 1)
        raw["moe"] = MOE
        if kind == "fam":  # fam layers need a dense MLP: the MoE layer is a global one among them
            kinds = [kind] * layers
            kinds[layers // 2] = "global"
            raw["attention_layers"] = [[kinds, 1]]
    execution = {k: raw.pop(k) for k in list(raw) if k in EXECUTION_KEYS}
    cfg = config_from_dict({"model": raw, "execution": execution})
    validate(cfg, check_paths=False)
    return cfg


def _plain_two_streams(layers, x1, x2):
    """The reference: megatron's own layer halves (attention + residual, MLP + residual) applied
    to two streams with ordinary autograd, everything kept."""
    for layer in layers:
        if hasattr(layer, "forward_attention_residual"):  # fam: its FAM chain runs in the attention half
            x1 = x1 + (layer.forward_attention_residual(x2) - x2)
        else:
            x1 = x1 + (layer._forward_attention(x2, attention_mask=None)[0] - x2)
        x2 = x2 + (layer._forward_mlp(x1) - x1)
    return x1, x2


def _loss(y1, y2, aux):
    w = torch.linspace(-1, 1, y1.numel(), dtype=y1.dtype).view_as(y1)
    return (y1 * w).sum() + (y2 * w.flip(0)).sum() + (aux if aux is not None else 0)


def _grads(model, x):
    return [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                               for p in model.parameters()]


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_reversible_gradients_equal_plain_two_stream_stack(one_process, kind):
    cfg = _cfg(kind)
    torch.manual_seed(0)
    model = build_model(cfg, 50).double().train()
    layers = list(model.decoder.layers)
    x0 = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)

    x = x0.clone().requires_grad_(True)
    torch.manual_seed(1)
    r1, r2 = _plain_two_streams(layers, x, x)
    _loss(r1, r2, moe_aux_loss(model)).backward()
    ref = _grads(model, x)
    ref_stats = [layer.mlp.stats.load.clone() for layer in layers if hasattr(layer.mlp, "stats")]
    model.zero_grad(set_to_none=True)

    x = x0.clone().requires_grad_(True)
    recomputed = []
    torch.manual_seed(1)
    y1, y2 = run_reversible(layers, x, x, {}, recomputed.append)
    aux = moe_aux_loss(model)
    _loss(y1, y2, aux).backward()
    got = _grads(model, x)

    torch.testing.assert_close(y1, r1, rtol=0, atol=1e-10)
    torch.testing.assert_close(y2, r2, rtol=0, atol=1e-10)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, got, ref):
        assert (a - b).abs().max() <= 1e-8, f"{kind}: gradient of {name} differs by {(a - b).abs().max()}"
    assert any(g.abs().sum() > 0 for g in got[1:]), "no gradient reached the layers"
    # recomputed block inputs equal the originals
    (c1, c2), = recomputed
    assert (c1 - x0).abs().max() <= 1e-10 and (c2 - x0).abs().max() <= 1e-10
    # MoE: the aux loss took part once (its gradient matched above) and the recomputation left the
    # forward's router statistics in place
    moe = [layer.mlp for layer in layers if hasattr(layer.mlp, "stats")]
    assert len(moe) == 1 and moe[0].aux_loss.grad_fn is not None
    torch.testing.assert_close(moe[0].stats.load, ref_stats[0], rtol=0, atol=0)


def test_reversible_model_trains_and_keeps_parameter_names(one_process):
    plain = build_model(_cfg(moe=False), 50)
    torch.manual_seed(0)
    model = build_model(_cfg(moe=False, reversible=True, reversible_merge="second"), 50)
    assert isinstance(model.decoder, ReversibleTransformerBlock)
    assert list(model.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 50, (BATCH, SEQ))
    model.eval()
    with torch.no_grad():  # eval without autograd: the Function runs forward only
        before = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        model(tokens, position_ids_for(tokens), None, labels=tokens).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    assert after < before - 0.1


@pytest.mark.parametrize("merge", ["mean", "split", "second"])
def test_merges_of_the_two_streams(one_process, merge):
    """mean: (y1 + y2) / 2 from x1 = x2 = e; split: y1 + y2 from x1 = x2 = e / 2, which is
    e + sum F + sum G like the plain stack's residual sum; second: y2 from x1 = x2 = e."""
    torch.manual_seed(0)
    model = build_model(_cfg(moe=False, reversible=True, reversible_merge=merge, hidden_dropout=0.0,
                             attention_dropout=0.0), 50).double()
    block = model.decoder
    e = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    start = e / 2 if merge == "split" else e
    r1, r2 = _plain_two_streams(list(block.layers), start, start)
    expected = {"mean": (r1 + r2) / 2, "split": r1 + r2, "second": r2}[merge]
    with torch.no_grad():
        torch.testing.assert_close(block(e, None), block.final_layernorm(expected), rtol=0, atol=1e-10)


def test_streams_cross_a_pipeline_stage_boundary(one_process):
    """The decoder cut in two stages (the first not post-processing, the second not pre-processing,
    fed by set_input_tensor) gives the whole decoder's output and gradients."""
    import copy

    torch.manual_seed(0)
    model = build_model(_cfg(layers=4, reversible=True, hidden_dropout=0.0, attention_dropout=0.0), 50).double()
    whole = model.decoder
    x0 = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)

    x = x0.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same router noise in both runs
    (whole(x, None) ** 2).sum().backward()
    ref = [x.grad] + [p.grad.clone() for p in whole.parameters()]
    whole.zero_grad(set_to_none=True)

    first, second = copy.copy(whole), copy.copy(whole)
    first._modules, second._modules = dict(whole._modules), dict(whole._modules)
    first.layers, second.layers = whole.layers[:2], whole.layers[2:]
    first.post_process, first.final_layernorm = False, None
    second.pre_process = False
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(1)
    sent = first(x, None)
    assert sent.shape == (2 * SEQ, BATCH, HIDDEN)
    received = sent.detach().requires_grad_(True)  # what the next stage receives
    second.set_input_tensor(received)
    (second(None, None) ** 2).sum().backward()
    sent.backward(received.grad)
    got = [x.grad] + [p.grad for p in whole.parameters()]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunks", [2, 4])
def test_chunked_ffn_equals_unchunked_and_never_builds_the_whole_intermediate(one_process, chunks):
    torch.manual_seed(0)
    model = build_model(_cfg(moe=False, hidden_dropout=0.0, attention_dropout=0.0), 50).double()
    mlp = model.decoder.layers[0].mlp
    x0 = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)

    def run(n):
        mlp.__class__, mlp.ffn_chunks = ChunkedMLP, n
        mlp.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        rows = []
        hook = mlp.linear_fc1.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
        out, bias = mlp(x)
        (out * torch.cos(x0)).sum().backward()
        hook.remove()
        return out.detach(), [x.grad] + [p.grad for p in mlp.parameters()], rows

    ref, ref_grads, _ = run(1)
    out, grads, rows = run(chunks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # forward and the per-chunk recomputation in backward: each saw SEQ / chunks rows only
    assert rows == [SEQ // chunks] * (2 * chunks)


def test_chunked_ffn_inside_reversible_model_matches_plain_reversible(one_process):
    tokens = torch.randint(0, 50, (BATCH, SEQ))
    losses, grads = [], []
    for chunks in (1, 4):
        torch.manual_seed(0)
        model = build_model(_cfg(moe=False, reversible=True, ffn_chunks=chunks), 50).double()
        torch.manual_seed(3)
        loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _kept_bytes(fn, params) -> int:
    """Bytes of activations kept for backward while `fn()` runs forward: tensors saved by autograd
    (parameters excluded) plus RNG states kept by the reversible Function."""
    param_ptrs = {p.data_ptr() for p in params}
    seen, total = set(), [0]

    def pack(t):
        key = (t.data_ptr(), t.shape)
        if t.data_ptr() not in param_ptrs and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    node = out[0].grad_fn
    for f_state, g_state in getattr(node, "states", []):
        for state in (f_state, g_state):
            for t in state:
                if isinstance(t, torch.Tensor) and (t.data_ptr(), t.shape) not in seen:
                    seen.add((t.data_ptr(), t.shape))
                    total[0] += t.numel() * t.element_size()
    return total[0]


def test_activation_memory_is_flat_in_depth_for_reversible_and_linear_for_plain(one_process):
    kept = {}
    for depth in (6, 24):
        cfg = config_from_dict({"model": {"num_layers": depth, "hidden_size": HIDDEN, "num_attention_heads": 4,
                                          "max_position_embeddings": 64, "attention_layers": [[["global"], depth]]}})
        validate(cfg, check_paths=False)
        model = build_model(cfg, 50)
        layers = list(model.decoder.layers)
        x = torch.randn(64, BATCH, HIDDEN, requires_grad=True)
        kept["rev", depth] = _kept_bytes(lambda: run_reversible(layers, x, x, {}), model.parameters())
        kept["plain", depth] = _kept_bytes(lambda: _plain_two_streams(layers, x, x), model.parameters())
    assert kept["rev", 24] <= 1.2 * kept["rev", 6], kept
    assert 3.5 <= kept["plain", 24] / kept["plain", 6] <= 4.5, kept
    assert kept["rev", 24] < kept["plain", 6] / 4, kept


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="execution.ffn_chunks: 3 does not divide the sequence length 16"):
        _cfg(moe=False, ffn_chunks=3)
    with pytest.raises(ConfigError, match="execution.ffn_chunks: must be >= 1"):
        _cfg(moe=False, ffn_chunks=0)
    with pytest.raises(ConfigError, match="model.reversible_merge: must be one of"):
        _cfg(moe=False, reversible=True, reversible_merge="concat")
    with pytest.raises(ConfigError, match="execution.recompute_granularity: reversible layers"):
        _cfg(moe=False, reversible=True, recompute_granularity="selective")
    with pytest.raises(ConfigError, match="execution.recompute_granularity: full recompute needs"):
        _cfg(moe=False, recompute_granularity="full")
    with pytest.raises(ConfigError, match="execution.recompute_method: only used"):
        _cfg(moe=False, recompute_method="uniform")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_megatron_recompute_runs_on_cpu_and_equals_no_recompute(one_process, granularity, moe):
    """With MoE layers the loss includes their aux loss, as a training step's does: full recompute
    runs their first forward without autograd, and the aux loss's gradient must still reach the
    routers (it used to be lost: the router gradients differed)."""
    tokens = torch.randint(0, 50, (BATCH, SEQ))
    extra = {"recompute_method": "uniform", "recompute_num_layers": 1} if granularity == "full" else {}
    results, kept = [], []
    for options in ({}, {"recompute_granularity": granularity, **extra}):
        torch.manual_seed(0)
        model = build_model(_cfg(moe=moe, hidden_dropout=0.0, attention_dropout=0.0, **options), 50).double()
        kept.append(_kept_bytes(lambda: (model(tokens, position_ids_for(tokens), None, labels=tokens),),
                                model.parameters()))
        loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
        if moe:
            aux = moe_aux_loss(model, grad_scale=0.5)
            assert float(aux) > 0
            loss = loss + 0.5 * aux
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert kept[1] < kept[0], kept  # the recompute did drop activations
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_reversible_model_trains_via_cli_and_exports_to_hugging_face(tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import run_cli, tiny_overrides
    from megalong.export.hf import export_checkpoint
    from test_export import assert_same_logits_and_greedy_tokens

    extra = {"model.reversible": "true", "execution.ffn_chunks": 4, "model.mlp_layers": "[dense, moe]",
             "model.moe": "{num_experts: 4, top_k: 2, dropless: true, capacity_factor: null}", "train.lr": 3e-3}
    proc = run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "ckpt", 4, **extra)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegalongForCausalLM"
    assert_same_logits_and_greedy_tokens(hf, tmp_path / "ckpt", length=30, prompt="Return the", new_tokens=8)


def test_reversible_fam_model_with_split_merge_exports_to_hugging_face(tiny_data, tmp_path):
    """fam layers in a reversible stack (their FAM chain inside the attention half), trained in
    this process and exported: the same logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_overrides
    from megalong.config import load_config
    from megalong.export.hf import export_checkpoint
    from megalong.train.loop import train
    from test_export import assert_same_logits_and_greedy_tokens

    extra = {"model.reversible": "true", "model.reversible_merge": "split",
             "model.attention_layers": '[[["fam", "global"], 1]]',
             "model.attention": "{fam: {block_size: 8, fam_length: 4}}", "model.normalization": "RMSNorm",
             "train.lr": 3e-3}
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "ckpt", 2, **extra) if a != "--set"]
    try:
        train(load_config([], args))
    finally:
        shutdown()
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert_same_logits_and_greedy_tokens(hf, tmp_path / "ckpt", length=30, prompt="Return the", new_tokens=8)


# ---- tensor parallelism: one spawned 2-process job against one process -----------------------


def _tp_summary(tp: int) -> dict:
    """Loss and gradients of a float64 reversible model (with an MoE layer) on this rank, reduced
    to numbers that do not depend on the TP split: the loss, the replicated parameters' gradients,
    and each parameter's squared gradient norm summed over its shards."""
    from megatron.core import parallel_state

    torch.manual_seed(0)
    model = build_model(_cfg(reversible=True, hidden_dropout=0.0, attention_dropout=0.0,
                             moe={**MOE, "router": "topk"}), 50).double()
    tokens = torch.arange(BATCH * SEQ).view(BATCH, SEQ) * 7 % 50
    loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean() + moe_aux_loss(model)
    loss.backward()
    out = {"loss": loss.item()}
    for name, p in model.named_parameters():
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
            out[name] = sq.item()
        else:
            out[name] = [sq.item(), p.grad.flatten()[:8].tolist()]
    return out


def _tp_worker(path: str) -> None:
    tp = int(os.environ["WORLD_SIZE"])
    initialize(tp)
    summary = _tp_summary(tp)
    if torch.distributed.get_rank() == 0:
        Path(path).write_text(json.dumps(summary))
    shutdown()


def test_tensor_parallel_two_equals_one(tmp_path, one_process):
    ref = _tp_summary(1)
    out = tmp_path / "tp2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", "2", "--master_port", str(_free_port()), __file__, "--tp-worker", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_summary(json.loads(out.read_text()), ref)


def _assert_same_summary(got: dict, ref: dict) -> None:
    # megatron's vocab-parallel cross entropy runs in float32 even for a float64 model, so TP=2
    # and TP=1 agree to float32 rounding (~1e-9 here), not to float64's; a TP bug is ~1e-2.
    tol = 1e-7
    assert got.keys() == ref.keys()
    assert abs(got["loss"] - ref["loss"]) < tol
    for name in ref:
        if name == "loss":
            continue
        a, b = got[name], ref[name]
        a_sq, b_sq = (a[0] if isinstance(a, list) else a), (b[0] if isinstance(b, list) else b)
        assert abs(a_sq - b_sq) <= tol * max(1.0, b_sq), (name, a_sq, b_sq)
        if isinstance(a, list):  # replicated on the TP ranks: the values themselves
            assert max(abs(u - v) for u, v in zip(a[1], b[1])) <= tol, name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__" and sys.argv[1:2] == ["--tp-worker"]:
    _tp_worker(sys.argv[2])
