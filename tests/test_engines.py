"""One training loop (megalong/train/loop.py) drives every engine: the same tiny MoE run, three steps,
through the plain torch engine, megatron-core's DDP engine (forced here at one data-parallel rank:
the loop picks it for two and more) and DeepSpeed ZeRO-1 gives the same losses, the same metrics and
log lines (the MoE report included), and checkpoints that each engine resumes from."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import read_metrics, tiny_overrides
from megalong.checkpoint.step import load_merged_state
from megalong.config import load_config
from megalong.parallel.distributed import shutdown
from megalong.train import loop
from megalong.train.engines import build_engine
from megalong.train.megatron_engine import MegatronEngine
from megalong.train.torch_engine import TorchEngine

STEPS = 3
MOE = {"model.mlp_layers": '[[["dense", "moe"], 1]]', "train.micro_batch_size": 1,
       "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, bias_update_rate: 0.01}",
       "train.eval_interval": 2}
# The same float32 model and Adam; the engines sum gradients and step in another order
# (megatron's contiguous buffers, DeepSpeed's flattened partitions): float32 rounding.
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


def _run(data, save_dir, monkeypatch, engine=None, **extra):
    cfg = load_config([], [a for a in tiny_overrides(data, save_dir, STEPS, **MOE, **extra) if a != "--set"])
    built = []

    def build(cfg, layout, chunks):
        made = engine(chunks, cfg, layout) if engine else build_engine(cfg, layout, chunks)
        built.append(type(made).__name__)
        return made

    monkeypatch.setattr(loop, "build_engine", build)
    try:
        return loop.train(cfg), built
    finally:
        shutdown()


def _keys(save_dir) -> set[str]:
    return {k for line in (save_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}


def test_one_loop_drives_every_engine(tiny_data, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="megalong")
    runs = {"torch": (TorchEngine, {}), "megatron_ddp": (MegatronEngine, {})}
    try:
        import deepspeed  # noqa: F401

        runs["deepspeed"] = (None, {"train.engine": "deepspeed", "deepspeed.zero_stage": 1})
    except ImportError:
        pass
    results, logs = {}, {}
    for name, (engine, extra) in runs.items():
        caplog.clear()
        results[name], built = _run(tiny_data, tmp_path / name, monkeypatch, engine, **extra)
        assert built == [{"torch": "TorchEngine", "megatron_ddp": "MegatronEngine",
                          "deepspeed": "DeepSpeedEngine"}[name]]
        logs[name] = caplog.text
    reference = results["torch"]
    assert sorted(reference.losses) == [1, 2, 3] and reference.valid_losses.keys() == {2, 3}
    weights = load_merged_state(tmp_path / "torch")[1]
    for name, result in results.items():
        for step, loss in reference.losses.items():
            assert abs(result.losses[step] - loss) < LOSS_TOL, (name, step, result.losses[step], loss)
        for step, loss in reference.valid_losses.items():
            assert abs(result.valid_losses[step] - loss) < LOSS_TOL, (name, step)
        assert _keys(tmp_path / name) == _keys(tmp_path / "torch"), name  # one metrics format
        assert "train/moe_aux_loss" in _keys(tmp_path / name) and "moe/layer2/load_cv" in _keys(tmp_path / name)
        for text in ("step 3/3 | loss ", "  moe: aux loss ", "step 2: held-out loss ", "held-out loss "):
            assert text in logs[name], (name, text)
        merged = load_merged_state(tmp_path / name)[1]
        assert merged.keys() == weights.keys(), name
        for key, tensor in weights.items():
            if isinstance(tensor, torch.Tensor):
                assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)


@pytest.mark.parametrize("engine", [TorchEngine, MegatronEngine])
def test_every_engine_resumes_its_own_checkpoint_exactly(engine, tiny_data, tmp_path, monkeypatch):
    whole, _ = _run(tiny_data, tmp_path / "whole", monkeypatch, engine)
    _run(tiny_data, tmp_path / "resumed", monkeypatch, engine, **{"train.stop_at_step": 2})
    resumed, _ = _run(tiny_data, tmp_path / "resumed", monkeypatch, engine, **{"train.load": "auto"})
    assert sorted(resumed.losses) == [3] and resumed.losses[3] == whole.losses[3]
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "whole")
