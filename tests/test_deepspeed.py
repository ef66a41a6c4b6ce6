"""DeepSpeed engine: ZeRO-1/2/3 on two gloo processes give the one-process (megatron engine) losses
and weights, and resume exactly from their checkpoints; the config validator refuses the
combinations it does not support."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, free_port, read_metrics, tiny_overrides, train_here
from megalong.config import ConfigError, load_config
from megalong.checkpoint.step import load_merged_state

pytest.importorskip("deepspeed")

STEPS = 5
# ZeRO-1/2: a dense and an MoE layer (top-2, capacity, aux-loss-free bias balancing); one sample
# per micro-batch so that every run routes the same tokens together (the same capacity).
# ZeRO-3 (which refuses MoE layers): the dense model, also one sample per micro-batch.
DENSE = {"train.micro_batch_size": 1}
MOE = {
    "model.mlp_layers": '[[["dense", "moe"], 1]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, bias_update_rate: 0.01}",
    **DENSE,
}
# As in test_parallel.py: reductions run in another order (DeepSpeed averages the two data-parallel
# halves of the batch, in flattened buckets), so losses agree to float32 rounding; Adam magnifies
# rounding in tiny gradients, so the weights get a wider bound.
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4

# Several trainings in one torchrun job (megatron and DeepSpeed import once); megatron's groups
# are rebuilt between runs because the tensor-parallel size changes.
WORKER = textwrap.dedent("""
    import json, sys
    from megatron.core import parallel_state
    from megalong.cli import quiet_megatron_warnings, setup_logging
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown, world_size_from_env
    from megalong.train.loop import train
    quiet_megatron_warnings()
    setup_logging()
    for overrides in json.load(open(sys.argv[1])):
        train(load_config([], overrides, world_size=world_size_from_env()))
        parallel_state.destroy_model_parallel()
    shutdown()
""")


def _overrides(tiny_data, save_dir, **extra):
    return [a for a in tiny_overrides(tiny_data, save_dir, STEPS, **extra) if a != "--set"]


def test_zero_stages_match_one_process(tiny_data, tmp_path):
    runs = {  # name: (reference, overrides)
        "zero1": ("moe", {"deepspeed.zero_stage": 1}),
        "zero2_offload": ("moe", {"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "true"}),
        "zero3": ("dense", {"deepspeed.zero_stage": 3}),
        "tp2_zero3": ("dense", {"deepspeed.zero_stage": 3, "parallel.tensor": 2}),  # TP=2 x DP=1
    }
    models = {"moe": MOE, "dense": DENSE}
    jobs = [_overrides(tiny_data, tmp_path / name, **models[ref], **{"train.engine": "deepspeed", **extra})
            for name, (ref, extra) in runs.items()]
    # Stopped at step 3 and resumed (DeepSpeed's own files, read through megalong's weights-only guard).
    resumed = {"zero1": "zero1_resumed", "zero3": "zero3_resumed"}
    for name, target in resumed.items():
        ref, extra = runs[name]
        for stage in ({"train.stop_at_step": 3}, {"train.load": "auto"}):
            jobs.append(_overrides(tiny_data, tmp_path / target, **models[ref],
                                   **{"train.engine": "deepspeed", **extra, **stage}))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(tmp_path / "worker.py"), str(tmp_path / "jobs.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]

    singles, references = {}, {}
    for ref, model in models.items():  # the megatron engine, one process
        train_here(_overrides(tiny_data, tmp_path / ref, **model))  # in pytest's process: no spawn
        singles[ref] = read_metrics(tmp_path / ref)
        assert sorted(singles[ref]) == list(range(1, STEPS + 1)) and singles[ref][STEPS] < singles[ref][1]
        references[ref] = load_merged_state(tmp_path / ref)[1]
    for name, target in resumed.items():
        assert read_metrics(tmp_path / target) == read_metrics(tmp_path / name), name  # exactly
    for name, (ref, _) in runs.items():
        single, reference = singles[ref], references[ref]
        losses = read_metrics(tmp_path / name)
        assert sorted(losses) == sorted(single), name
        for step in single:
            assert abs(losses[step] - single[step]) < LOSS_TOL, (name, step, losses[step], single[step])
        info, merged = load_merged_state(tmp_path / name)  # whole weights, gathered from ZeRO-3 shards
        assert info.meta["engine"] == "deepspeed" and (info.path / "deepspeed").is_dir()
        assert merged.keys() == reference.keys()
        for key, tensor in reference.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)


@pytest.mark.parametrize("overrides, message", [
    ({"deepspeed.zero_stage": 4}, r"deepspeed.zero_stage: must be 1, 2 or 3"),
    ({"deepspeed.zero_stage": 2, "parallel.pipeline": 2},
     r"parallel.pipeline: 2 pipeline stages are not supported with train.engine: deepspeed"),
    ({"parallel.expert": 2}, r"parallel.expert: expert parallelism \(2\) is not supported"),
    ({"deepspeed.config": "{zero_optimization: {stage: 2}}"}, r"deepspeed.config.zero_optimization.stage: set by megalong"),
    ({"deepspeed.config": "{train_batch_size: 8}"}, r"deepspeed.config.train_batch_size: set by megalong"),
    ({"deepspeed.zero_stage": 3}, r"deepspeed.zero_stage: ZeRO-3 is not supported with MoE layers"),
])
def test_unsupported_combinations_are_refused(overrides, message, tiny_data, tmp_path):
    extra = {"train.engine": "deepspeed", "model.mlp_layers": '[[["dense", "moe"], 1]]',
             "model.moe": "{num_experts: 4}", **overrides}
    args = [a for a in tiny_overrides(tiny_data, tmp_path, **extra) if a != "--set"]
    with pytest.raises(ConfigError, match=message):
        load_config([], args, world_size=2)


def test_deepspeed_section_needs_the_deepspeed_engine(tiny_data, tmp_path):
    args = [a for a in tiny_overrides(tiny_data, tmp_path, **{"deepspeed.zero_stage": 2}) if a != "--set"]
    with pytest.raises(ConfigError, match=r"deepspeed: this section is used only with train.engine: deepspeed"):
        load_config([], args)


def test_deepspeed_config_is_derived_from_the_train_section(tiny_data, tmp_path):
    from megalong.train.deepspeed_engine import deepspeed_config

    args = [a for a in tiny_overrides(tiny_data, tmp_path, **{
        "train.engine": "deepspeed", "deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "true",
        "deepspeed.config": "{zero_optimization: {reduce_bucket_size: 1000}, communication_data_type: fp32}",
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "execution.precision": "bf16"}) if a != "--set"]
    ds = deepspeed_config(load_config([], args, world_size=2), data_parallel=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["communication_data_type"] == "fp32" and ds["gradient_clipping"] == 1.0
