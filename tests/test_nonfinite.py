"""train.nonfinite: a NaN put into the loss of chosen steps (tests/nonfinite_hooks.py). skip: the
step leaves weights, MoE router biases and Adam's state exactly as they were, is counted and logged,
and max_skipped_steps in a row stop the run with its newest checkpoint from before them, which
loads; stop: the run ends at the first such step, and nothing is saved after it. In one process,
and under DP=2 (megatron-core's optimizer) and PP=2 (the pipeline step), and with DeepSpeed ZeRO-1."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, free_port, read_metrics, tiny_overrides
from megalong.config import load_config
from megalong.errors import TrainingError
from megalong.parallel.distributed import shutdown
from megalong.checkpoint import step as ckpt
from megalong.train.loop import train
from nonfinite_hooks import Recorder, install

MOE = {"model.mlp_layers": '[[["dense", "moe"], 1]]',
       "model.moe": "{num_experts: 2, top_k: 1, bias_update_rate: 0.01, aux_loss_coeff: 0.0}"}


@pytest.fixture(autouse=True)
def _restore_logging():
    """`megalong.cli.main` points the log at this test's captured stdout; put it back after."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def _run(recorder: Recorder, overrides: list[str]):
    uninstall = install(recorder)
    try:
        return train(load_config([], [a for a in overrides if a != "--set"]))
    finally:
        uninstall()
        shutdown()


def _steps(save_dir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in save_dir.glob("step_*"))


def test_skip_drops_the_update_exactly_and_counts_it(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megalong")
    recorder = Recorder(bad_steps={3})
    result = _run(recorder, tiny_overrides(tiny_data, tmp_path, 5, **MOE, **{
        "train.nonfinite": "skip", "train.save_interval": 1, "train.log_interval": 2}))
    # Step 3's update was dropped: weights (router biases among the buffers) and Adam's moments
    # and step counts are bit for bit those before it; every other step changed both.
    assert recorder.unchanged[3] == (True, True)
    assert all(recorder.unchanged[s] == (False, False) for s in (1, 2, 4, 5)), recorder.unchanged
    assert torch.isnan(torch.tensor(result.losses[3])) and all(
        torch.isfinite(torch.tensor(result.losses[s])) for s in (1, 2, 4, 5))
    assert read_metrics(tmp_path, "train/skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    assert read_metrics(tmp_path)[3] is None  # NaN is written as null (strict JSON)
    assert "step 3: skipped (loss nan, gradient norm nan); 1 in a row, 1 in total" in caplog.text
    assert "step 3: no checkpoint written: the last 1 steps were skipped" in caplog.text
    assert _steps(tmp_path) == [1, 2, 4, 5]


def test_max_skipped_steps_stop_the_run_and_the_last_good_checkpoint_loads(tiny_data, tmp_path, capsys):
    from megalong.cli import main

    recorder = Recorder(bad_steps=range(3, 100))
    uninstall = install(recorder)
    try:
        rc = main(["train", *tiny_overrides(tiny_data, tmp_path, 8, **{
            "train.nonfinite": "skip", "train.max_skipped_steps": 3, "train.save_interval": 1,
            "train.log_interval": 100})])
    finally:
        uninstall()
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("megalong:")]
    assert line == (f"megalong: train error: train.max_skipped_steps: 3 steps in a row (steps 3-5) had a "
                    f"non-finite loss or gradient norm and were skipped; stopping (the newest checkpoint, "
                    f"{tmp_path / 'step_00000002'}, is from before it)")
    assert _steps(tmp_path) == [1, 2] and all(recorder.unchanged[s] == (True, True) for s in (3, 4, 5))
    info, state = ckpt.load_merged_state(tmp_path)
    assert info.meta["step"] == 2 and all(torch.isfinite(v).all() for v in state.values()
                                          if isinstance(v, torch.Tensor) and v.is_floating_point())
    # ... and resumes: the same run without the NaN finishes from it
    resumed = _run(Recorder(bad_steps=()), tiny_overrides(tiny_data, tmp_path, 4, **{"train.load": "auto"}))
    assert sorted(resumed.losses) == [3, 4] and resumed.checkpoint == tmp_path / "step_00000004"


def test_stop_saves_nothing_after_the_first_nonfinite_step(tiny_data, tmp_path):
    """The loop checks the losses at log intervals only (no extra host sync per step), and also
    before every checkpoint: the NaN of step 3 stops the run at the step-4 save."""
    with pytest.raises(TrainingError, match=r"^train\.nonfinite: step 3 has a non-finite loss nan, gradient "
                                            r"norm nan; stopping \(the newest checkpoint, .*step_00000002, is "
                                            r"from before it\)"):
        _run(Recorder(bad_steps={3}), tiny_overrides(tiny_data, tmp_path, 8, **{
            "train.save_interval": 2, "train.log_interval": 100}))
    assert _steps(tmp_path) == [2]
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]  # metrics up to the step that stopped it


def test_skip_under_data_and_pipeline_parallelism(tiny_data, tmp_path):
    """DP=2 through megatron-core's DDP and (distributed) optimizer, PP=2 through the pipeline
    step: the NaN comes from rank 0 only, and every rank drops the same step."""
    runs = []
    for name, extra, rank in (("dp2", {"parallel.distributed_optimizer": "true", **MOE}, 0),
                              ("pp2", {"parallel.pipeline": 2}, 1)):  # the loss is on the last stage
        args = tiny_overrides(tiny_data, tmp_path / name, 3, **{"train.nonfinite": "skip", **extra})
        runs.append({"overrides": [a for a in args if a != "--set"], "bad_steps": [2],
                     "inject_rank": rank, "out": str(tmp_path / name)})
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "nonfinite_driver.py"), str(spec)]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name in ("dp2", "pp2"):
        for rank in (0, 1):
            record = json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())
            assert record["error"] is None, (name, record)
            assert record["unchanged"] == {"1": [False, False], "2": [True, True], "3": [False, False]}, (name, rank)
        assert read_metrics(tmp_path / name, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}, name


def test_deepspeed_zero1_drops_the_step(tiny_data, tmp_path):
    """DeepSpeed's ZeRO-1/2 optimizer drops a step with a non-finite gradient norm itself; megalong
    counts it (engine.was_step_applied). The final checkpoint after the skipped last step holds the
    weights of step 2."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from nonfinite_hooks import Recorder, install
        from megalong.cli import main
        install(Recorder(bad_steps={{3}}, calls_per_step=2))
        sys.exit(main(sys.argv[1:]))
    """)
    args = tiny_overrides(tiny_data, tmp_path, 3, **{"train.engine": "deepspeed", "train.nonfinite": "skip",
                                                      "train.save_interval": 1, "deepspeed.zero_stage": 1})
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, "train", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "step 3: skipped (loss nan" in proc.stdout
    assert read_metrics(tmp_path, "train/skipped_steps") == {1: 0, 2: 0, 3: 1}
    assert _steps(tmp_path) == [1, 2, 3]
    first, before, after = ({k: v for k, v in ckpt.load_merged_state(tmp_path / f"step_0000000{s}")[1].items()
                             if isinstance(v, torch.Tensor)} for s in (1, 2, 3))
    assert before and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(first[k], before[k]) for k in before)
