"""Training loop: it learns, logs, resumes exactly, and never corrupts its last good checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, read_metrics, tiny_overrides
from megalong.config import load_config
from megalong.parallel.distributed import shutdown
from megalong.checkpoint import step as ckpt
from megalong.errors import CheckpointError
from megalong.checkpoint.layout import find_latest
from megalong.train.loop import train


def tiny_config(data, save_dir, steps=5, **extra):
    args = tiny_overrides(data, save_dir, steps, **extra)
    return load_config([], [a for a in args if a != "--set"])


def run(cfg):
    try:
        return train(cfg)
    finally:
        shutdown()


def test_training_learns_logs_and_saves(tiny_data, tmp_path):
    result = run(tiny_config(tiny_data, tmp_path, steps=30, **{"train.lr": 3e-3, "train.log_interval": 10}))
    first, last = result.losses[1], result.losses[30]
    assert last < first - 1.0, (first, last)
    assert result.final_valid_loss is not None and result.checkpoint == tmp_path / "step_00000030"
    perf = read_metrics(tmp_path, "perf/tokens_per_s")
    assert sorted(perf) == [10, 20, 30] and all(v > 0 for v in perf.values())
    assert read_metrics(tmp_path, "perf/mfu") and read_metrics(tmp_path, "train/lr")
    saved = ckpt.read_checkpoint_info(tmp_path)
    assert saved.meta["step"] == 30 and saved.config.model.hidden_size == 64
    assert (saved.path / "tokenizer.model").is_file()


def test_resume_reproduces_uninterrupted_run_exactly(tiny_data, tmp_path):
    """Stop at step 4, resume, and get bit-identical losses for steps 5..8 (dropout on, so the
    RNG state must be restored too)."""
    extra = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
    straight = run(tiny_config(tiny_data, tmp_path / "a", steps=8, **extra))
    stopped = run(tiny_config(tiny_data, tmp_path / "b", steps=8, **extra, **{"train.stop_at_step": 4}))
    assert sorted(stopped.losses) == [1, 2, 3, 4]
    resumed = run(tiny_config(tiny_data, tmp_path / "b", steps=8, **extra, **{"train.load": "auto"}))
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in range(1, 5):
        assert stopped.losses[step] == straight.losses[step]
    for step in range(5, 9):
        assert resumed.losses[step] == straight.losses[step], step
    assert resumed.final_valid_loss == straight.final_valid_loss


def test_checkpoint_from_another_config_is_refused(tiny_data, tmp_path):
    run(tiny_config(tiny_data, tmp_path, steps=1))
    other = tiny_config(tiny_data, tmp_path / "other", steps=2,
                        **{"model.hidden_size": 128, "train.load": str(tmp_path)})
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 64, config 128"):
        run(other)


EXECUTION_AUTO = {"execution.kernels": "auto", "execution.loss_chunks": 1}
EXECUTION_CHANGED = {"execution.kernels": "reference", "execution.loss_chunks": 2, "execution.ffn_chunks": 2,
                     "execution.recompute_granularity": "full", "execution.recompute_method": "uniform",
                     "execution.recompute_num_layers": 1}


def test_resume_with_only_execution_keys_changed(tiny_data, tmp_path):
    """Execution keys are not the architecture: a checkpoint saved with kernels auto, one loss
    chunk and no recompute resumes with kernels reference, chunked loss and FFN and full recompute,
    and continues as the uninterrupted run does (the same function, summed in another order)."""
    straight = run(tiny_config(tiny_data, tmp_path / "a", steps=4, **EXECUTION_AUTO))
    run(tiny_config(tiny_data, tmp_path / "b", steps=4, **EXECUTION_AUTO, **{"train.stop_at_step": 2}))
    resumed = run(tiny_config(tiny_data, tmp_path / "b", steps=4, **EXECUTION_CHANGED, **{"train.load": "auto"}))
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert abs(resumed.losses[step] - straight.losses[step]) < 1e-5, (step, resumed.losses, straight.losses)
    saved = ckpt.read_checkpoint_info(tmp_path / "b").config
    assert (saved.execution.kernels, saved.execution.loss_chunks) == ("reference", 2)

    # An architecture key is still refused, named alone (the execution keys that differ are not).
    other = tiny_config(tiny_data, tmp_path / "c", steps=4,
                        **{"model.qkv_bias": "true", "train.load": str(tmp_path / "b" / "step_00000002")})
    with pytest.raises(CheckpointError, match=r"another model config: model.qkv_bias: checkpoint False, "
                                                   r"config True$"):
        run(other)


def test_checkpoint_saved_before_the_execution_section_resumes(tiny_data, tmp_path):
    """A config.yaml written when kernels/loss_chunks/recompute sat in `model` and precision/compile
    in `train` is migrated when read: the checkpoint resumes, bit-identical to the straight run."""
    import yaml

    straight = run(tiny_config(tiny_data, tmp_path / "a", steps=4))
    run(tiny_config(tiny_data, tmp_path / "b", steps=4, **{"train.stop_at_step": 2}))
    saved = tmp_path / "b" / "step_00000002" / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    execution = raw.pop("execution")
    for key in ("precision", "compile"):
        raw["train"][key] = execution.pop(key)
    raw["model"].update(execution)  # the old layout: every other execution key in `model`
    saved.write_text(yaml.safe_dump(raw, sort_keys=False))
    info = ckpt.read_checkpoint_info(saved.parent)
    assert info.config.execution.loss_chunks == 1 and "kernels" not in info.config.to_dict()["model"]
    resumed = run(tiny_config(tiny_data, tmp_path / "b", steps=4, **{"train.load": "auto"}))
    assert [resumed.losses[s] for s in (3, 4)] == [straight.losses[s] for s in (3, 4)]


def test_kill_during_save_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    """A process killed while writing step 4's checkpoint leaves step 2 intact and loadable."""
    args = tiny_overrides(tiny_data, tmp_path, 4, **{"train.save_interval": 2})
    script = textwrap.dedent(f"""
        import os, sys
        from megalong.checkpoint import native
        real_write = native.write_tensors
        def dying_write(path, *a, **k):
            if "step_00000004" in str(path):
                with open(path, "wb") as f:
                    f.write(b"half a checkpoint")
                os._exit(9)
            return real_write(path, *a, **k)
        native.write_tensors = dying_write
        from megalong.cli import main
        sys.exit(main(["train", *{args!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO),
                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not (tmp_path / "step_00000004").exists()
    assert find_latest(tmp_path) == tmp_path / "step_00000002"
    # The job resumes from the last good checkpoint and completes.
    result = run(load_config([], [a for a in args if a != "--set"] + ["train.load=auto"]))
    assert sorted(result.losses) == [3, 4]
    assert find_latest(tmp_path) == tmp_path / "step_00000004"
    assert ckpt.load_merged_state(tmp_path / "step_00000004")[1]
