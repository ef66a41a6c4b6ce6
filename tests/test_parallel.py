"""Tensor and data parallelism on two gloo processes give the one-process losses and weights."""
from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from conftest import overrides, read_metrics, run_cli, run_driver, train_here
from megalong.checkpoint.step import load_merged_state

# 12 heads (not a power of two) with ALiBi in global and local layers: TP=2 holds 6 heads per
# rank, so per-head slopes must be taken by global head index for the runs to agree. The second
# layer's MLP is a top-2 MoE with capacity and aux-loss-free bias balancing (loads summed over
# the data-parallel ranks must move the bias as one process's accumulated micro-batches do).
ALIBI_12_HEADS = {
    "model.mlp_layers": '[[["dense", "moe"], 1]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, bias_update_rate: 0.01}",
    "model.hidden_size": 96,
    "model.num_attention_heads": 12,
    "model.alibi": "true",
    "model.position_embedding": "none",
    "model.scale_attention": "true",
}
STEPS = 5
# Reductions run in a different order across processes (TP splits matmuls, DP averages two
# halves of the batch), so the losses agree to float32 rounding, not bit for bit. Weights get a
# wider bound: Adam divides each update by sqrt(v), which magnifies rounding differences in tiny
# gradients (seen: 3.3e-5 on one shared-expert weight after 5 steps at lr 1e-3, losses within 2e-5).
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


def _args(tiny_data, save_dir, **extra) -> list[str]:
    return overrides(tiny_data, save_dir, STEPS, **ALIBI_12_HEADS, **extra)


def _adam_share(save_dir) -> float:
    """The share of the weights whose Adam state rank 0 holds, from its log line."""
    match = re.search(r"Adam state for ([\d,]+) of ([\d,]+) weights", (save_dir / "train.log").read_text())
    held, total = (int(g.replace(",", "")) for g in match.groups())
    return held / total


def _assert_norms_close(save_dir, reference_dir, name):
    """Gradient norms before clipping, relative 1e-4: Adam is blind to a wrong gradient scale
    (the losses would still agree), the norm is not."""
    norms, reference = read_metrics(save_dir, "train/grad_norm"), read_metrics(reference_dir, "train/grad_norm")
    for step, value in norms.items():
        assert abs(value - reference[step]) < 1e-4 * reference[step], (name, step, value, reference[step])


def _optimizer_state(path):
    from megalong.checkpoint.native import merged_state
    from megalong.checkpoint.step import read_checkpoint_info

    return merged_state(read_checkpoint_info(path), "optim")


def _assert_close(merged, reference, tol, label):
    assert merged.keys() == reference.keys(), label
    for name, tensor in reference.items():
        if isinstance(tensor, torch.Tensor):
            assert (merged[name] - tensor).abs().max().item() < tol, (label, name)


# 8 sequences per step in micro-batches of 2: one process accumulates 4 of them, each of two
# data-parallel ranks 2 (so megatron DDP's no_sync path is taken). Small gradient buckets make
# megatron's DDP reduce (and its distributed optimizer shard) in several buckets.
BATCH = {"train.global_batch_size": 8, "train.save_interval": 3}
DIST_OPT = {"parallel.distributed_optimizer": "true", "parallel.overlap_grad_reduce": "true",
            "parallel.ddp_bucket_size": 20000}


def test_tp2_and_dp2_match_one_process(tiny_data, tmp_path):
    """TP=2, DP=2 with megatron-core DDP, DP=2 with its distributed optimizer (Adam state sharded,
    gradients reduce-scattered in overlapped buckets), and DP=2 with the distributed optimizer
    resumed from the one-process checkpoint at step 3: the one-process losses, weights and Adam
    state."""
    train_here(_args(tiny_data, tmp_path / "single", **BATCH))  # in pytest's process: no spawn
    # The four two-process runs in one torchrun job (tests/parallel_driver.py); the resumed run
    # comes after the one-process run that saved its step-3 checkpoint.
    run_driver([_args(tiny_data, tmp_path / "tp2", **{"parallel.tensor": 2}, **BATCH),
                _args(tiny_data, tmp_path / "dp2", **BATCH),
                _args(tiny_data, tmp_path / "dist_opt", **BATCH, **DIST_OPT),
                _args(tiny_data, tmp_path / "resumed", **BATCH, **DIST_OPT,
                      **{"train.load": str(tmp_path / "single" / "step_00000003")})], 2, tmp_path)
    single, tp2, dp2, dist_opt, resumed = (read_metrics(tmp_path / name)
                                           for name in ("single", "tp2", "dp2", "dist_opt", "resumed"))
    assert sorted(single) == sorted(tp2) == sorted(dp2) == sorted(dist_opt) == list(range(1, STEPS + 1))
    assert sorted(resumed) == [4, 5]
    assert single[STEPS] < single[1]  # it trains
    assert _adam_share(tmp_path / "dp2") == 1.0
    assert 0.45 < _adam_share(tmp_path / "dist_opt") < 0.55  # sharded over the two ranks
    for name, run in (("tp2", tp2), ("dp2", dp2), ("dist_opt", dist_opt), ("resumed", resumed)):
        for step in run:
            assert abs(run[step] - single[step]) < LOSS_TOL, (name, step, run[step], single[step])
        _assert_norms_close(tmp_path / name, tmp_path / "single", name)

    # Same weights and Adam state after training, with the TP=2 shards merged and the distributed
    # optimizer's shards gathered (so also the same initial weights).
    _, reference = load_merged_state(tmp_path / "single")
    reference_adam = _optimizer_state(tmp_path / "single")
    assert any(k.endswith("exp_avg_sq") for k in reference_adam)
    for other in ("tp2", "dp2", "dist_opt", "resumed"):
        info, merged = load_merged_state(tmp_path / other)
        assert info.meta["tensor_parallel"] == (2 if other == "tp2" else 1)
        _assert_close(merged, reference, WEIGHT_TOL, other)
        _assert_close(_optimizer_state(tmp_path / other), reference_adam, WEIGHT_TOL, other + " adam")


def test_torchrun_launcher_dry_run_prints_the_command(tiny_data):
    data = ["--set", f"data.tokenizer={tiny_data.tokenizer}", "--set", f"data.train=[{tiny_data.prefix}]",
            "--set", "train.micro_batch_size=8"]  # the launcher validates the config for 2 processes
    proc = run_cli(["train", "configs/tiny-cpu.yaml", *data, "--dry-run"], nproc=2, launcher="torchrun.sh")
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m megalong.cli train configs/tiny-cpu.yaml" \
        in proc.stdout


MOE_ONLY = {
    "model.mlp_layers": '[[["moe", "dense"], 1]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, num_shared_experts: 1}",
    "train.micro_batch_size": 1,  # the same tokens per micro-batch (so the same capacity) everywhere
}


def test_expert_parallel_matches_one_process(tiny_data, tmp_path):
    """EP=2 (2 processes), EP=2 x DP=2 and EP=2 x TP=2 (4 processes) against one process: same
    losses, and the gathered experts equal the one-process experts."""
    def args(name, expert, tensor=1):
        return overrides(tiny_data, tmp_path / name, STEPS, **MOE_ONLY,
                         **{"parallel.expert": expert, "parallel.tensor": tensor})

    train_here(args("single", 1))  # in pytest's process: no spawn
    run_driver([args("ep2", 2)], 2, tmp_path)
    run_driver([args("ep2dp2", 2), args("ep2tp2", 2, tensor=2)], 4, tmp_path)  # one 4-process job
    runs = {name: read_metrics(tmp_path / name) for name in ("single", "ep2", "ep2dp2", "ep2tp2")}
    single = runs["single"]
    for name, losses in runs.items():
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step in single:
            assert abs(losses[step] - single[step]) < LOSS_TOL, (name, step, losses[step], single[step])
        _assert_norms_close(tmp_path / name, tmp_path / "single", name)

    _, reference = load_merged_state(tmp_path / "single")
    for other in ("ep2", "ep2dp2", "ep2tp2"):
        info, merged = load_merged_state(tmp_path / other)
        assert info.meta["expert_parallel"] == 2
        assert sorted(p.name for p in info.path.glob("experts_*")) == ["experts_ep00.safetensors",
                                                                        "experts_ep01.safetensors"]
        model_files = [load_file(f) for f in info.path.glob("model_tp*.safetensors")]
        assert not any(".experts." in k for f in model_files for k in f)  # each expert saved once
        assert merged["decoder.layers.0.mlp.experts.w1"].shape[0] == 4
        for name, tensor in reference.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[name] - tensor).abs().max().item() < WEIGHT_TOL, (other, name)
