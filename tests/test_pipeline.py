"""Pipeline, tensor, expert and data parallelism in one 4-process gloo job, each layout against
one process: the same losses over 5 steps from the same initial weights and data, the same
weights after training, and checkpoints that reshard (TP2 x PP2 <-> one process) and continue the
one-process loss curve. Reversible models at PP=2 and TP2 x PP2 against a reversible one-process
run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, read_metrics, tiny_overrides
from megalong.config import ConfigError, config_from_dict, load_config, validate
from megalong.parallel.distributed import shutdown
from megalong.train.checkpoint import load_merged_state
from megalong.train.loop import train

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
# Four processes; what is not model-parallel is data-parallel (e.g. "pp2" is PP=2 x DP=2).
LAYOUTS = {
    "tp2": {"parallel.tensor": 2},
    "pp2": {"parallel.pipeline": 2},
    "pp2_vp2": {"parallel.pipeline": 2, "parallel.virtual_stages": 2},
    "pp2_uneven": {"parallel.pipeline": 2, "parallel.pipeline_layers": "[1, 3]"},
    "tp2_pp2": {"parallel.tensor": 2, "parallel.pipeline": 2},
    "ep2_tp2": {"parallel.expert": 2, "parallel.tensor": 2},
    "pp4": {"parallel.pipeline": 4},
}
# Reversible layers (megalong/model/reversible.py): both streams cross the stage boundaries.
REVERSIBLE = {"model.reversible": "true"}
REVERSIBLE_LAYOUTS = {"pp2_reversible": {"parallel.pipeline": 2},
                      "tp2_pp2_reversible": {"parallel.tensor": 2, "parallel.pipeline": 2}}
# Reductions run in another order across processes (TP splits matmuls, DP averages halves of the
# batch, PP sums the grad norm per stage), so losses agree to float32 rounding, not bit for bit;
# weights get a wider bound since Adam's 1/sqrt(v) magnifies rounding in tiny gradients.
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


def _args(data, save_dir, **extra) -> list[str]:
    return [a for a in tiny_overrides(data, save_dir, STEPS, **MODEL, **extra) if a != "--set"]


def _train_here(args: list[str]):
    try:
        return train(load_config([], args))
    finally:
        shutdown()


def _torchrun(runs: list[list[str]], nproc: int, tmp_path) -> None:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(REPO / "tests" / "parallel_driver.py"), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]


def _close(losses: dict[int, float], reference: dict[int, float], steps, name: str) -> None:
    assert sorted(losses) == list(steps), (name, sorted(losses))
    for step in steps:
        assert abs(losses[step] - reference[step]) < LOSS_TOL, (name, step, losses[step], reference[step])


def test_every_layout_matches_one_process_and_checkpoints_reshard(tiny_data, tmp_path):
    single = tmp_path / "single"
    _train_here(_args(tiny_data, single, **{"train.save_interval": 3}))  # saves steps 3 and 5
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
    _torchrun(runs, 4, tmp_path)

    single_reversible = tmp_path / "single_reversible"
    _train_here(_args(tiny_data, single_reversible, **REVERSIBLE))
    _, reversible_weights = load_merged_state(single_reversible)
    for name in REVERSIBLE_LAYOUTS:
        _close(read_metrics(tmp_path / name), read_metrics(single_reversible), range(1, STEPS + 1), name)
        _close(read_metrics(tmp_path / name, "train/moe_aux_loss"),
               read_metrics(single_reversible, "train/moe_aux_loss"), range(1, STEPS + 1), name + " aux")
        _, merged = load_merged_state(tmp_path / name)
        for key, tensor in reversible_weights.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)

    _, weights = load_merged_state(single)
    for name in LAYOUTS:
        _close(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        aux = read_metrics(tmp_path / name, "train/moe_aux_loss")
        _close(aux, reference_aux, range(1, STEPS + 1), name + " aux")
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

    _close(read_metrics(tmp_path / "from_single"), reference, [4, 5], "one process -> TP2 x PP2")
    _close(read_metrics(tmp_path / "stop3"), reference, [1, 2, 3], "TP2 x PP2 stopped")
    resumed = _train_here(_args(tiny_data, tmp_path / "stop3", **{"train.load": "auto"}))
    assert sorted(resumed.losses) == [4, 5]
    for step in (4, 5):
        assert abs(resumed.losses[step] - reference[step]) < LOSS_TOL, ("TP2 x PP2 -> one process", step)


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
from megalong.parallel import cpu_compat
try:
    torch.empty(2, device="cuda")
    raise SystemExit("CUDA tensor without CUDA and without the compatibility layer")
except (RuntimeError, AssertionError):
    pass
assert not cpu_compat.is_enabled()
assert cpu_compat.enable() and cpu_compat.enable() and cpu_compat.is_enabled()
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

    from megalong.parallel.cpu_compat import keep_rotary_embedding_on_cpu

    rotary = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000,
                             use_cpu_initialization=True)
    keep_rotary_embedding_on_cpu(rotary)
    emb = rotary(5)
    positions = torch.arange(5.0)[:, None]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    expected = torch.cat([positions * inv_freq, positions * inv_freq], dim=-1)
    assert emb.shape == (5, 1, 1, 8)
    torch.testing.assert_close(emb[:, 0, 0], expected)
