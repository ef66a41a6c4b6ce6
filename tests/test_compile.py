"""execution.compile: compiled transformer layers give the eager model's losses and gradients."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_overrides, train_here
from megalong.attention.registry import ATTENTION_KINDS
from megalong.config import config_from_dict, validate
from megalong.model.compile import compile_layers
from megalong.model.gpt import build_model
from megalong.moe.layer import moe_aux_loss
from megalong.parallel.distributed import initialize, shutdown
from megalong.train.losses import lm_loss

SEQ, VOCAB = 16, 64
KIND_OPTIONS = {"local": {"window": 4, "dilation": [1, 2, 1, 2], "global_tokens": 2},
                "lsh": {"bucket_size": 4, "n_hashes": 2}, "linear": {"chunk_size": 4},
                "axial": {"axial_shape": [4, 4]}, "fam": {"block_size": 4, "fam_length": 2}}


@pytest.fixture
def one_process():
    initialize(1)
    yield
    shutdown()


def _cfg(kind: str, reversible: bool):
    """Two layers: `kind` with a dense MLP, then global with a top-2 MoE (ALiBi with local)."""
    raw = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": SEQ,
           "vocab_size": VOCAB, "attention_layers": [[[kind, "global"], 1]],
           "attention": {kind: KIND_OPTIONS[kind]} if kind in KIND_OPTIONS else {},
           "mlp_layers": [[["dense", "moe"], 1]],
           "moe": {"num_experts": 4, "top_k": 2, "dropless": True, "capacity_factor": None, "router_dtype": "fp64"},
           "reversible": reversible}
    if kind == "local":
        raw.update(alibi=True, position_embedding="none")
    cfg = config_from_dict({"model": raw})
    validate(cfg, check_paths=False)
    return cfg


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch) + moe_aux_loss(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_compiled_layers_match_eager_for_every_kind(one_process, kind, reversible):
    """Dynamo's graphs through aot_autograd (the backend without code generation, so that every
    kind is traced in CI's time): float64 losses and gradients equal the eager model's, on two
    successive calls (the second runs the cached graphs)."""
    cfg = _cfg(kind, reversible)
    torch.manual_seed(0)
    eager = build_model(cfg, VOCAB).double().train()
    torch.manual_seed(0)
    compiled = build_model(cfg, VOCAB).double().train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_layers(compiled, backend="aot_eager") == (4 if reversible else 2)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ, dtype=torch.float64)}
    loss, grads = _loss_and_grads(eager, batch)
    for _ in range(2):
        compiled_loss, compiled_grads = _loss_and_grads(compiled, batch)
        assert abs(compiled_loss - loss) < 1e-12
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(compiled_grads[name], grad, rtol=0, atol=1e-12), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not skipped



def test_compiled_layers_follow_eager_when_the_sequence_length_changes(one_process):
    """Eval batches or a shorter last batch change the length: each length gets its own static
    graph. Dynamo's automatic dynamic shapes (the default) traced the windowed layer with a
    symbolic length and crashed in SDPA's decomposition (`view size is not compatible`)."""
    cfg = _cfg("local", reversible=False)
    torch.manual_seed(0)
    eager = build_model(cfg, VOCAB).double().train()
    torch.manual_seed(0)
    compiled = build_model(cfg, VOCAB).double().train()
    torch._dynamo.reset()
    compile_layers(compiled, backend="aot_eager")
    for length in (SEQ, SEQ // 2, 3 * SEQ // 4):
        tokens = torch.randint(0, VOCAB, (2, length + 1), generator=torch.Generator().manual_seed(length))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": torch.ones(2, length, dtype=torch.float64)}
        loss, _ = _loss_and_grads(eager, batch)
        compiled_loss, _ = _loss_and_grads(compiled, batch)
        assert abs(compiled_loss - loss) < 1e-12, length

# The functions that launch the kernels, by module (each wrapped in kernels.select.eager).
KERNEL_ENTRY_POINTS = (("attention.local", "window_kernel"), ("attention.global_attention", "alibi_kernel"),
                      ("attention.linear", "elu_kernel"), ("attention.lsh", "chunk_kernel"),
                      ("attention.fam", "fam_blocks_kernel"), ("moe.router", "gating_kernel"),
                      ("moe.layer", "fused_experts"))


@pytest.mark.parametrize("kind", ["local", "global", "linear", "lsh", "fam"])
def test_compiled_layers_run_the_triton_kernels_eagerly(one_process, monkeypatch, kind):
    """With the kernels forced (Triton's CPU interpreter here), a compiled layer stops its graph at
    each kernel entry point and runs it eagerly: losses and gradients equal the eager model's on
    the same kernels, and the kernels ran in both."""
    from megalong.kernels import select

    options = {"local": {"window": 8, "dilation": [1, 2], "global_tokens": 2}, "linear": {"chunk_size": 8},
               "lsh": {"bucket_size": 16, "n_hashes": 2}, "fam": {"block_size": 8, "fam_length": 2}}
    alibi = kind in ("local", "global", "fam")
    cfg = config_from_dict({"model": {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 32,
        "vocab_size": VOCAB, "attention_layers": [[[kind, "global"], 1]], "attention": {kind: options.get(kind, {})},
        "mlp_layers": [[["dense", "moe"], 1]], "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 2.0},
        "alibi": alibi, "position_embedding": "none" if alibi else "learned"}})
    validate(cfg, check_paths=False, world_size=1)
    calls: list[str] = []
    monkeypatch.setattr(select, "use_kernels", lambda *a, **kw: True)
    import megalong.attention.linear as linear

    monkeypatch.setattr(linear, "linear_kernel_covers", lambda *a: True)  # float32 on the kernel here
    for module_name, name in KERNEL_ENTRY_POINTS:
        module = importlib.import_module(f"megalong.{module_name}")
        def counted(*args, _name=name, _run=getattr(module, name), **kwargs):  # noqa: B008 (binds the loop value)
            calls.append(_name)
            return _run(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    tokens = torch.arange(64).view(2, 32) * 7 % VOCAB
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 32)}
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB).train()
        if compiled:
            torch._dynamo.reset()
            compile_layers(model, backend="aot_eager")
        calls.clear()
        results.append(_loss_and_grads(model, batch) + (sorted(set(calls)),))
    (loss, grads, ran), (compiled_loss, compiled_grads, compiled_ran) = results
    assert compiled_ran == ran and "fused_experts" in ran and len(ran) == 3 + (alibi and kind != "global")
    assert abs(compiled_loss - loss) < 1e-6
    for name, grad in grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=0, atol=1e-5), name


# ALiBi and a top-2 MoE layer with capacity, on the tiny GPT-Neo-shaped model of conftest.
TRAIN_EXTRA = {"model.mlp_layers": '[[["dense", "moe"], 1]]',
               "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5}",
               "model.alibi": "true", "model.position_embedding": "none"}


@pytest.fixture(scope="module")
def eager_run(tiny_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("eager")
    train_here([a for a in tiny_overrides(tiny_data, save_dir, **TRAIN_EXTRA) if a != "--set"])  # no spawn
    return save_dir


# TP=2 compiles with inductor (code generation); the other layouts test megatron's pipeline schedule
# and DDP around compiled layers, so their graphs run through aot_autograd without code generation
# (torch's own backend override), which keeps CI's time down.
AOT_EAGER = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}


@pytest.mark.parametrize("layout,env", [
    ({"parallel.tensor": 2}, None),
    ({"parallel.pipeline": 2}, AOT_EAGER),
    ({"parallel.distributed_optimizer": "true", "parallel.overlap_grad_reduce": "true"}, AOT_EAGER)],
    ids=["tp2_inductor", "pp2", "dp2_distributed_optimizer"])
def test_compiled_training_on_two_processes_matches_eager_one_process(tiny_data, eager_run, tmp_path, layout, env):
    """The training CLI with execution.compile on two gloo processes, tensor-parallel, pipelined
    (megatron's schedule), or data-parallel through megatron-core's DDP and distributed optimizer,
    follows the eager one-process run's losses and gradient norms."""
    run_cli(["train", *tiny_overrides(tiny_data, tmp_path, **TRAIN_EXTRA, **layout,
                                      **{"execution.compile": "true"})], nproc=2, env=env)
    for key, tol in (("train/loss", 2e-5), ("train/grad_norm", 1e-4)):
        eager, compiled = read_metrics(eager_run, key), read_metrics(tmp_path, key)
        assert compiled.keys() == eager.keys() and len(eager) == 5
        for step, value in eager.items():
            assert abs(compiled[step] - value) <= tol * max(1.0, value), (key, step, compiled[step], value)
