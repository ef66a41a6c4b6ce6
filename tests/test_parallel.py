"""Tensor and data parallelism on two gloo processes give the one-process losses and weights."""
from __future__ import annotations

import torch

from conftest import read_metrics, run_cli, tiny_overrides
from megalong.train.checkpoint import load_merged_state

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


def _run(tiny_data, save_dir, nproc=1, launcher="python", **extra):
    run_cli(["train", *tiny_overrides(tiny_data, save_dir, STEPS, **ALIBI_12_HEADS, **extra)],
            nproc=nproc, launcher=launcher)
    return read_metrics(save_dir)


def test_tp2_and_dp2_match_one_process(tiny_data, tmp_path):
    single = _run(tiny_data, tmp_path / "single")
    tp2 = _run(tiny_data, tmp_path / "tp2", nproc=2, launcher="torchrun.sh", **{"parallel.tensor": 2})
    dp2 = _run(tiny_data, tmp_path / "dp2", nproc=2)
    assert sorted(single) == sorted(tp2) == sorted(dp2) == list(range(1, STEPS + 1))
    assert single[STEPS] < single[1]  # it trains
    for step in single:
        assert abs(tp2[step] - single[step]) < LOSS_TOL, (step, tp2[step], single[step])
        assert abs(dp2[step] - single[step]) < LOSS_TOL, (step, dp2[step], single[step])

    # Same weights after training, with the TP=2 shards merged (so also the same initial weights).
    _, reference = load_merged_state(tmp_path / "single")
    for other in ("tp2", "dp2"):
        info, merged = load_merged_state(tmp_path / other)
        assert info.meta["tensor_parallel"] == (2 if other == "tp2" else 1)
        assert merged.keys() == reference.keys()
        for name, tensor in reference.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[name] - tensor).abs().max().item() < WEIGHT_TOL, (other, name)


def test_torchrun_launcher_dry_run_prints_the_command():
    proc = run_cli(["train", "configs/tiny-cpu.yaml", "--dry-run"], nproc=3, launcher="torchrun.sh")
    assert "torch.distributed.run --standalone --nproc_per_node 3 -m megalong.cli train configs/tiny-cpu.yaml" \
        in proc.stdout


MOE_ONLY = {
    "model.mlp_layers": '[[["moe", "dense"], 1]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, num_shared_experts: 1}",
    "train.micro_batch_size": 1,  # the same tokens per micro-batch (so the same capacity) everywhere
}


def test_expert_parallel_matches_one_process(tiny_data, tmp_path):
    """EP=2 (2 processes), EP=2 x DP=2 and EP=2 x TP=2 (4 processes) against one process: same
    losses, and the gathered experts equal the one-process experts."""
    def run(name, nproc, expert, tensor=1):
        run_cli(["train", *tiny_overrides(tiny_data, tmp_path / name, STEPS, **MOE_ONLY,
                                          **{"parallel.expert": expert, "parallel.tensor": tensor})], nproc=nproc)
        return read_metrics(tmp_path / name)

    runs = {"single": run("single", 1, 1), "ep2": run("ep2", 2, 2), "ep2dp2": run("ep2dp2", 4, 2),
            "ep2tp2": run("ep2tp2", 4, 2, tensor=2)}
    single = runs["single"]
    for name, losses in runs.items():
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step in single:
            assert abs(losses[step] - single[step]) < LOSS_TOL, (name, step, losses[step], single[step])

    _, reference = load_merged_state(tmp_path / "single")
    for other in ("ep2", "ep2dp2", "ep2tp2"):
        info, merged = load_merged_state(tmp_path / other)
        assert info.meta["expert_parallel"] == 2
        assert sorted(p.name for p in info.path.glob("experts_*.pt")) == ["experts_ep00.pt", "experts_ep01.pt"]
        model_files = [torch.load(f, weights_only=False) for f in info.path.glob("model_tp*.pt")]
        assert not any(".experts." in k for f in model_files for k in f)  # each expert saved once
        assert merged["decoder.layers.0.mlp.experts.w1"].shape[0] == 4
        for name, tensor in reference.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[name] - tensor).abs().max().item() < WEIGHT_TOL, (other, name)
