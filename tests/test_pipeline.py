"""Pipeline, tensor, expert and data parallelism in one 4-process gloo job, each layout against
one process: the same losses over 5 steps from the same initial weights and data, the same
weights after training, and checkpoints that reshard (TP2 x PP2 <-> one process) and continue the
one-process loss curve. Reversible models at PP=2 and TP2 x PP2 against a reversible one-process
run. Every attention kind, ALiBi and MoE layers inside pipeline stages (with EP, TP, virtual
stages, reversible) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_metrics, run_driver, tiny_overrides, train_here
from equality import LOSS_TOL, WEIGHT_TOL, close_losses, close_norms
from megalong.config import ConfigError, config_from_dict, validate
from megalong.checkpoint.step import load_merged_state

STEPS = 5
# Global and local attention, learned positions, tied embeddings; layers 2 and 4 are top-2 MoE
# layers with a shared expert (their aux losses are produced on the stage that holds them).
# One sample per micro-batch everywhere, so MoE capacity sees the same tokens in every layout.
MODEL = {
    "model.num_layers": 4,
    "model.attention_layers": '[[["global", "local"], 2]]',
    "model.mlp_layers": '[[["dense", "moe"], 2]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, num_shared_experts: 1, aux_loss_coeff: 0.1, z_loss_coeff: 0.01}",
    "train.micro_batch_size": 1,
}
# Four processes; what is not model-parallel is data-parallel (e.g. "pp2" is PP=2 x DP=2), through
# megatron-core's DDP, with its distributed optimizer in two layouts (dense and expert Adam state
# sharded over the data-parallel and expert-data-parallel ranks, overlapped gradient reduction).
DIST_OPT = {"parallel.distributed_optimizer": "true", "parallel.overlap_grad_reduce": "true"}
LAYOUTS = {
    "tp2": {"parallel.tensor": 2},
    "pp2": {"parallel.pipeline": 2},
    "pp2_vp2": {"parallel.pipeline": 2, "parallel.virtual_stages": 2, **DIST_OPT},
    "pp2_uneven": {"parallel.pipeline": 2, "parallel.pipeline_layers": "[1, 3]"},
    "tp2_pp2": {"parallel.tensor": 2, "parallel.pipeline": 2},
    "ep2_tp2": {"parallel.expert": 2, "parallel.tensor": 2, **DIST_OPT},
    "pp4": {"parallel.pipeline": 4},
}
# Reversible layers (megalong/model/reversible.py): both streams cross the stage boundaries.
REVERSIBLE = {"model.reversible": "true"}
REVERSIBLE_LAYOUTS = {"pp2_reversible": {"parallel.pipeline": 2},
                      "tp2_pp2_reversible": {"parallel.tensor": 2, "parallel.pipeline": 2}}
# Reductions run in another order across processes (TP splits matmuls, DP averages halves of the
# batch, PP sums the grad norm per stage), so losses agree to float32 rounding, not bit for bit;
# weights get a wider bound since Adam's 1/sqrt(v) magnifies rounding in tiny gradients.


def _args(data, save_dir, **extra) -> list[str]:
    return [a for a in tiny_overrides(data, save_dir, STEPS, **MODEL, **extra) if a != "--set"]


def _moe_keys(save_dir) -> set[str]:
    lines = (Path(save_dir) / "metrics.jsonl").read_text().splitlines()
    return {k for line in lines for k in json.loads(line) if k.startswith("moe/layer")}


def test_every_layout_matches_one_process_and_checkpoints_reshard(tiny_data, tmp_path):
    single = tmp_path / "single"
    train_here(_args(tiny_data, single, **{"train.save_interval": 3}))  # saves steps 3 and 5
    reference = read_metrics(single)
    assert reference[STEPS] < reference[1]  # it trains
    reference_aux = read_metrics(single, "train/moe_aux_loss")

    runs = [_args(tiny_data, tmp_path / name, **layout) for name, layout in LAYOUTS.items()]
    # Resharding: one process's step-3 checkpoint continued at TP2 x PP2, and a TP2 x PP2 run
    # stopped at step 3 (continued below by one process).
    runs.append(_args(tiny_data, tmp_path / "from_single", **LAYOUTS["tp2_pp2"],
                      **{"train.load": str(single / "step_00000003")}))
    runs.append(_args(tiny_data, tmp_path / "stop3", **LAYOUTS["tp2_pp2"], **{"train.stop_at_step": 3}))
    runs += [_args(tiny_data, tmp_path / name, **layout, **REVERSIBLE) for name, layout in REVERSIBLE_LAYOUTS.items()]
    run_driver(runs, 4, tmp_path)

    single_reversible = tmp_path / "single_reversible"
    train_here(_args(tiny_data, single_reversible, **REVERSIBLE))
    _, reversible_weights = load_merged_state(single_reversible)
    for name in REVERSIBLE_LAYOUTS:
        close_losses(read_metrics(tmp_path / name), read_metrics(single_reversible), range(1, STEPS + 1), name)
        close_losses(read_metrics(tmp_path / name, "train/moe_aux_loss"),
               read_metrics(single_reversible, "train/moe_aux_loss"), range(1, STEPS + 1), name + " aux")
        close_norms(tmp_path / name, single_reversible, name)
        _, merged = load_merged_state(tmp_path / name)
        for key, tensor in reversible_weights.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)

    _, weights = load_merged_state(single)
    for name in LAYOUTS:
        close_losses(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        aux = read_metrics(tmp_path / name, "train/moe_aux_loss")
        close_losses(aux, reference_aux, range(1, STEPS + 1), name + " aux")
        close_norms(tmp_path / name, single, name)
        assert _moe_keys(tmp_path / name) == _moe_keys(single), name  # every stage's MoE layers logged
        info, merged = load_merged_state(tmp_path / name)
        assert merged.keys() == weights.keys(), name
        for key, tensor in weights.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)
    assert load_merged_state(tmp_path / "tp2_pp2")[0].meta["pipeline_parallel"] == 2

    # Hugging Face export from a TP2 x PP2 checkpoint holds the one-process export's weights.
    from safetensors.torch import load_file

    from megalong.export.hf import export_checkpoint

    exported = {}
    for name in ("single", "tp2_pp2"):
        export_checkpoint(tmp_path / name, tmp_path / f"hf_{name}")
        exported[name] = load_file(tmp_path / f"hf_{name}" / "model.safetensors")
    assert exported["single"].keys() == exported["tp2_pp2"].keys()
    for key, tensor in exported["single"].items():
        assert (exported["tp2_pp2"][key] - tensor).abs().max().item() < WEIGHT_TOL, key

    close_losses(read_metrics(tmp_path / "from_single"), reference, [4, 5], "one process -> TP2 x PP2")
    close_losses(read_metrics(tmp_path / "stop3"), reference, [1, 2, 3], "TP2 x PP2 stopped")
    resumed = train_here(_args(tiny_data, tmp_path / "stop3", **{"train.load": "auto"}))
    assert sorted(resumed.losses) == [4, 5]
    for step in (4, 5):
        assert abs(resumed.losses[step] - reference[step]) < LOSS_TOL, ("TP2 x PP2 -> one process", step)


# Every attention kind inside pipeline stages, with MoE layers (top-2, load-balance and z-loss) on
# both stages of PP=2. Sequences of 16 (4 x 4 axial grid, 4 LSH buckets, 4 FAM blocks).
# KINDS: one layer of each kind, axial position embeddings (on the first stage only). The LSH layer
# is the first of stage 1, so its rotations (seeded by the global layer number) and the stage's
# layer offsets are checked; the local layer has dilation per head and global tokens.
KIND_OPTIONS = ("{local: {window: 4, dilation: [1, 2, 1, 3], global_tokens: [0, 5]}, linear: {chunk_size: 8}, "
                "lsh: {bucket_size: 4, n_hashes: 2}, axial: {axial_shape: [4, 4]}, "
                "fam: {block_size: 4, memory_segments: 1, fam_length: 2}}")
KINDS = {
    "model.num_layers": 6,
    "model.max_position_embeddings": 16,
    "model.attention_layers": '[[["global", "local", "linear", "lsh", "axial", "fam"], 1]]',
    "model.mlp_layers": '[[["moe", "dense"], 3]]',  # fam layers need a dense MLP
    "model.attention": KIND_OPTIONS,
    "model.position_embedding": "axial",
    "model.axial_position": "{shape: [4, 4]}",
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, aux_loss_coeff: 0.1, z_loss_coeff: 0.01}",
    "train.micro_batch_size": 1,
}
# ALIBI: the kinds that take ALiBi (linear has no scores to bias), one layer per virtual stage, and
# 4 micro-batches per rank at PP=2 x VP=2 x DP=2: more than one group of the interleaved schedule,
# whose steady state sends activations and gradients both ways between the two stages at once.
ALIBI = {**KINDS, "model.num_layers": 4, "model.attention_layers": '[[["lsh", "local", "axial", "fam"], 1]]',
         "model.mlp_layers": '[[["moe", "dense"], 2]]', "model.position_embedding": "none",
         "model.axial_position": "{}", "model.alibi": "true", "train.global_batch_size": 8}
# name: (model, layout); four processes, the rest data-parallel (PP=2 x EP=2 x DP=2 for "ep2").
KIND_RUNS = {
    "kinds_pp2": (KINDS, {"parallel.pipeline": 2}),
    "kinds_pp2_ep2": (KINDS, {"parallel.pipeline": 2, "parallel.expert": 2}),
    "kinds_tp2_pp2": (KINDS, {"parallel.tensor": 2, "parallel.pipeline": 2}),
    "kinds_pp2_reversible": ({**KINDS, "model.reversible": "true"}, {"parallel.pipeline": 2}),
    "alibi_pp2_vp2": (ALIBI, {"parallel.pipeline": 2, "parallel.virtual_stages": 2}),
}


def test_every_attention_kind_and_moe_inside_pipeline_stages(tiny_data, tmp_path):
    """The mixed models above at PP=2, PP=2 x EP=2, TP=2 x PP=2, reversible PP=2 and interleaved
    PP=2 x VP=2 against one process: the same LM loss, MoE aux loss and (clipped) grad norm at each
    of 5 steps, the same held-out loss after them, and the same weights."""
    runs = [[a for a in tiny_overrides(tiny_data, tmp_path / name, STEPS, **model, **layout) if a != "--set"]
            for name, (model, layout) in KIND_RUNS.items()]
    run_driver(runs, 4, tmp_path)

    singles: dict[str, Path] = {}
    for name, (model, _) in KIND_RUNS.items():
        key = json.dumps(model, sort_keys=True)
        if key not in singles:
            singles[key] = tmp_path / f"single_{len(singles)}"
            train_here([a for a in tiny_overrides(tiny_data, singles[key], STEPS, **model) if a != "--set"])
        single = singles[key]
        for metric, tol, steps in (("train/loss", LOSS_TOL, range(1, STEPS + 1)),
                                   ("train/moe_aux_loss", LOSS_TOL, range(1, STEPS + 1)),
                                   ("train/grad_norm", 1e-4, range(1, STEPS + 1)),
                                   ("valid/loss", LOSS_TOL, [STEPS])):
            got, want = read_metrics(tmp_path / name, metric), read_metrics(single, metric)
            assert sorted(got) == sorted(want) == list(steps), (name, metric, sorted(got), sorted(want))
            for step in want:
                assert abs(got[step] - want[step]) < tol, (name, metric, step, got[step], want[step])
        _, weights = load_merged_state(single)
        _, merged = load_merged_state(tmp_path / name)
        assert merged.keys() == weights.keys(), name
        for param, tensor in weights.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[param] - tensor).abs().max().item() < WEIGHT_TOL, (name, param)


@pytest.mark.parametrize("parallel, world, global_batch, message", [
    ({"pipeline": 3}, 3, 3, r"parallel.pipeline: model.num_layers 4 is not a multiple"),
    ({"pipeline": 2, "virtual_stages": 4}, 2, 2, r"parallel.pipeline: model.num_layers 4 is not a multiple"),
    ({"pipeline": 2}, 3, 3, r"parallel.pipeline: parallel.tensor x parallel.pipeline = 1 x 2 does not divide"),
    ({"virtual_stages": 2}, 1, 2, r"parallel.virtual_stages: 2 needs parallel.pipeline > 1"),
    ({"pipeline_layers": [1, 3]}, 1, 2, r"parallel.pipeline_layers: needs parallel.pipeline > 1"),
    ({"pipeline": 2, "pipeline_layers": [1, 2]}, 2, 2, r"parallel.pipeline_layers: \[1, 2\] must add up to"),
    ({"pipeline": 4, "pipeline_layers": [1, 2]}, 4, 4, r"parallel.pipeline_layers: the 1 layers left"),
    ({"pipeline": 2, "pipeline_layers": [0, 4]}, 2, 2, r"parallel.pipeline_layers: expected"),
    ({"pipeline": 2, "pipeline_layers": [1, 3], "virtual_stages": 2}, 2, 2, r"parallel.pipeline_layers: an uneven"),
    ({"pipeline": 2, "virtual_stages": 2}, 2, 3, r"parallel.virtual_stages: the interleaved schedule needs"),
])
def test_pipeline_config_errors_name_the_key(parallel, world, global_batch, message):
    cfg = config_from_dict({"model": {"num_layers": 4, "attention_layers": [[["global"], 4]]},
                            "train": {"micro_batch_size": 1, "global_batch_size": global_batch},
                            "parallel": parallel})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, check_paths=False, world_size=world)


def test_uneven_split_is_accepted():
    cfg = config_from_dict({"model": {"num_layers": 6, "attention_layers": [[["global"], 6]]},
                            "parallel": {"pipeline": 3, "pipeline_layers": [1, 1]}})
    validate(cfg, check_paths=False, world_size=3)
    from megalong.config import pipeline_split
    assert pipeline_split(cfg) == [1, 4, 1]


CPU_COMPAT_CHECK = """
import torch
from megalong.compat import cuda_on_cpu
try:
    torch.empty(2, device="cuda")
    raise SystemExit("CUDA tensor without CUDA and without the compatibility layer")
except (RuntimeError, AssertionError):
    pass
assert not cuda_on_cpu.is_enabled()
assert cuda_on_cpu.enable() and cuda_on_cpu.enable() and cuda_on_cpu.is_enabled()
assert not torch.cuda.is_available()  # megatron still takes its CPU branches
x = torch.arange(3.0)
assert torch.empty(2, device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
assert x.cuda() is x and x.to("cuda").device.type == "cpu" and x.to(device="cuda:0").device.type == "cpu"
assert x.to(torch.float64).dtype == torch.float64  # other arguments pass through
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    event = torch.cuda.Event()
    event.record()
    event.wait()
torch.cuda.synchronize()
assert torch.equal(torch.full((2,), 7.0, device="cuda"), torch.tensor([7.0, 7.0]))
print("ok")
"""


def test_cpu_compat_maps_cuda_to_cpu_only_when_enabled():
    """The compatibility layer in a fresh process (it is process-wide): CUDA device arguments,
    Tensor.cuda() and CUDA streams/events/synchronize work on the CPU once enabled, not before."""
    proc = subprocess.run([sys.executable, "-c", CPU_COMPAT_CHECK], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


def test_rotary_embedding_patch_matches_megatron_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megalong.compat import keep_rotary_embedding_on_cpu

    rotary = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000,
                             use_cpu_initialization=True)
    keep_rotary_embedding_on_cpu(rotary)
    emb = rotary(5)
    positions = torch.arange(5.0)[:, None]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    expected = torch.cat([positions * inv_freq, positions * inv_freq], dim=-1)
    assert emb.shape == (5, 1, 1, 8)
    torch.testing.assert_close(emb[:, 0, 0], expected)
