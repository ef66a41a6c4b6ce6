"""W&B (offline), plots and profiles of a real run: one MoE run stopped at step 4 and resumed to
step 6, both `megalong train` processes, logging to W&B offline (in a tmp WANDB_DIR) and profiling
steps 2-3; then what W&B wrote is read back and compared with metrics.jsonl, the resumed run's
W&B id with the first's, the trace files parsed, and the run plotted."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from conftest import run_cli, tiny_overrides
from megalong.config import ConfigError, config_from_dict, validate

HAS_WANDB = importlib.util.find_spec("wandb") is not None
STEPS = 6


@pytest.fixture(scope="module")
def tracked_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    save_dir, wandb_dir = root / "run", root / "wandb"
    extra = {"model.mlp_layers": '[[["dense", "moe"], 1]]', "model.moe": "{num_experts: 4, top_k: 2}",
             "train.eval_interval": 2, "train.save_interval": 2,
             "train.profile": "{start_step: 2, steps: 2}"}
    if HAS_WANDB:
        extra["train.wandb"] = "{project: megalong-test, name: tiny-moe, mode: offline}"
    env = {"WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    first = run_cli(["train", *tiny_overrides(tiny_data, save_dir, STEPS, **extra, **{"train.stop_at_step": 4})],
                    env=env)
    resumed = run_cli(["train", *tiny_overrides(tiny_data, save_dir, STEPS, **extra, **{"train.load": "auto"})],
                      env=env)
    return save_dir, wandb_dir, first.stdout + first.stderr, resumed.stdout + resumed.stderr


def _metrics(save_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record.pop("step"), {}).update(record)
    return out


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_logs_every_metric_and_a_resume_continues_the_run(tracked_run):
    from megalong.checkpoint.step import read_checkpoint_info
    from wandb_records import read_offline_run

    save_dir, wandb_dir, _, _ = tracked_run
    dirs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2, dirs  # the first run and its resumption
    runs = [read_offline_run(d) for d in dirs]
    run_id = runs[0]["id"]
    assert run_id and runs[1]["id"] == run_id and all(d.name.endswith(f"-{run_id}") for d in dirs)
    for step in (2, 4, 6):
        assert read_checkpoint_info(save_dir / f"step_{step:08d}").meta["wandb_run_id"] == run_id
    assert runs[0]["project"] == "megalong-test" and runs[0]["name"] == "tiny-moe"
    # the resolved config
    for run in runs:
        assert run["config"]["model"]["moe"]["num_experts"] == 4
        assert run["config"]["train"]["wandb"]["mode"] == "offline"
    assert runs[0]["config"]["train"]["load"] is None and runs[1]["config"]["train"]["load"] == "auto"
    # every scalar of metrics.jsonl, at its step, in the run that logged it
    metrics = _metrics(save_dir)
    assert sorted(runs[0]["history"]) == [1, 2, 3, 4] and sorted(runs[1]["history"]) == [5, 6]
    for run in runs:
        for step, logged in run["history"].items():
            expected = metrics[step]
            for key, value in expected.items():
                assert key in logged, (step, key)
                assert logged[key] == pytest.approx(value, rel=1e-12), (step, key)
    keys = set(runs[1]["history"][6])
    assert {"train/loss", "train/grad_norm", "train/lr", "valid/loss", "perf/mfu", "moe/layer2/load_cv"} <= keys
    loads = [runs[1]["history"][6][f"moe/layer2/expert{e}_load"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and all(0 <= v <= 1 for v in loads)


def test_profile_writes_a_trace_and_logs_the_top_operators(tracked_run):
    save_dir, _, first_log, resumed_log = tracked_run
    traces = sorted((save_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces  # steps 2-3 are in the first run only
    trace = json.loads(traces[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)
    assert any(n.startswith("aten::") and "backward" in n.lower() for n in names) or \
        any("Backward" in n for n in names)  # the backward pass is recorded too
    lines = [line for line in first_log.splitlines() if "profile of steps 2-3" in line]
    assert len(lines) == 1, first_log[-3000:]
    assert "top operators: aten::" in lines[0] and lines[0].endswith(f"; trace {traces[0]}")
    shares = [float(x) for x in re.findall(r" (\d+\.\d)%", lines[0])]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    assert "profile of steps" not in resumed_log


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_of_a_real_run(tracked_run, tmp_path):
    from megalong.plots.figure import plot_runs
    from megalong.plots.runs import read_run

    save_dir = tracked_run[0]
    run = read_run(save_dir)
    metrics = _metrics(save_dir)
    assert run.points("train/loss") == (list(range(1, STEPS + 1)), [metrics[s]["train/loss"] for s in range(1, 7)])
    layers, shares = run.expert_load()
    assert layers == [2] and len(shares[0]) == 4
    expected = [sum(metrics[s][f"moe/layer2/expert{e}_load"] for s in range(1, 7)) / 6 for e in range(4)]
    assert shares[0] == pytest.approx(expected)
    out = tmp_path / "run.png"
    panels = plot_runs([save_dir], out)
    assert panels == ["loss", "lr", "throughput", "grad_norm", "moe_load:run"]
    _check_png(out)
    # megalong eval --output into the run directory adds the perplexity-by-length panel
    results = save_dir / "eval.jsonl"
    try:
        proc = run_cli(["eval", str(save_dir), "--seq-length", "16", "--seq-length", "64", "--tokens", "1024",
                        "--output", str(results)])
        printed = [float(x) for x in re.findall(r"perplexity (\d+\.\d+)", proc.stdout)]
        saved = [json.loads(line) for line in results.read_text().splitlines()]
        assert [(r["step"], r["report"], r["seq_length"]) for r in saved] == [(6, "long_context", 16),
                                                                              (6, "long_context", 64)]
        assert [round(r["perplexity"], 2) for r in saved] == printed
        assert read_run(save_dir).perplexity_by_length == [(r["seq_length"], r["perplexity"]) for r in saved]
        assert plot_runs([save_dir], out)[-2:] == ["perplexity_vs_length", "moe_load:run"]
    finally:
        results.unlink(missing_ok=True)


def _check_png(path: Path, at_least: int = 10_000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > at_least, len(data)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 250, (width, height)
    return width, height


def _synthetic_run(path: Path, scale: float, eval_results: bool) -> None:
    path.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "train/loss": scale * 5 / math.sqrt(step), "train/grad_norm": 1 / step,
                      "train/lr": 1e-3 * min(1, step / 5)})
        if step % 5 == 0:
            lines.append({"step": step, "perf/tokens_per_s": 1000.0 * scale, "perf/mfu": 0.01,
                          "perf/memory_gib": 1.0})
            lines.append({"step": step, "valid/loss": scale * 6 / math.sqrt(step),
                          "valid/lower/loss": scale * 5.5 / math.sqrt(step)})
    lines.append({"step": 21, "train/loss": None, "train/lr": 1e-3})  # a NaN loss is written as null
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if eval_results:  # two evaluations of step 10 and one of step 20: the newest is plotted
        rows = [{"step": step, "report": "long_context", "seq_length": n, "loss": 1.0, "perplexity": p,
                 "tokens": 4096, "passkey": {"0.5": 1.0 - 0.25 * (n // 128), "0.1": 0.5}}
                for step, n, p in [(10, 64, 99.0), (10, 128, 98.0), (20, 64, 31.0), (20, 128, 32.0),
                                   (20, 256, 34.0)]]
        rows[2]["passkey"] = {"0.5": 0.75, "0.1": 0.25}  # step 20 replaces step 10's at 64
        (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(path / "metrics.jsonl", "a") as f:  # an eval appended to the run's own metrics
            f.write(json.dumps({"step": 20, "report": "other", "text": "ignored"}) + "\n")
            f.write(json.dumps({"step": 20, "eval/some_task/acc": 0.5}) + "\n")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_of_two_runs_side_by_side_through_the_cli(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _synthetic_run(a, 1.0, eval_results=True)
    _synthetic_run(b, 0.8, eval_results=False)
    from megalong.plots.runs import read_run, run_labels

    run = read_run(a)
    assert run.perplexity_by_length == [(64, 31.0), (128, 32.0), (256, 34.0)]
    assert run.passkey_by_length == {"0.5": [(64, 0.75), (128, 0.75), (256, 0.5)],
                                     "0.1": [(64, 0.25), (128, 0.5), (256, 0.5)]}
    assert run.series["eval/some_task/acc"] == {20: 0.5}
    assert run.points("train/loss")[0] == list(range(1, 21)) and 21 in run.series["train/lr"]
    assert run.points("valid/loss") == ([5, 10, 15, 20], [6 / math.sqrt(s) for s in (5, 10, 15, 20)])
    assert run_labels([a, b]) == ["a/run", "b/run"]
    out = tmp_path / "out" / "both.png"
    proc = run_cli(["plot", str(a), str(b), "-o", str(out)])
    assert f"wrote {out}: loss, lr, throughput, grad_norm, perplexity_vs_length, passkey_vs_length" in proc.stdout
    _check_png(out)


def test_plot_errors_name_the_file_and_line(tmp_path):
    from megalong.plots.runs import PlotError, read_run

    with pytest.raises(PlotError, match=r"no metrics.jsonl there"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": \n')
    with pytest.raises(PlotError, match=r"metrics.jsonl: line 2: not JSON"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": "high"}\n')
    with pytest.raises(PlotError, match=r"line 1: 'train/loss' must be a number"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "eval.jsonl").write_text('{"step": 1, "report": "long_context", "seq_length": "long"}\n')
    with pytest.raises(PlotError, match=r"eval.jsonl: line 1: a long_context record needs an integer 'seq_length'"):
        read_run(tmp_path)
    (tmp_path / "eval.jsonl").write_text('{"step": 1, "report": "long_context", "seq_length": 64, '
                                         '"perplexity": 9.0, "passkey": {"0.5": "all"}}\n')
    with pytest.raises(PlotError, match=r"eval.jsonl: line 1: 'passkey' must map depths to accuracies"):
        read_run(tmp_path)


BAD = [
    ({"wandb": {"mode": "cloud", "project": "p"}}, r"train\.wandb\.mode: must be one of"),
    ({"wandb": {"projct": "p"}}, r"unknown config key 'train\.wandb\.projct'; did you mean 'project'"),
    ({"wandb": {"name": "x"}}, r"train\.wandb\.name: given without train\.wandb\.project"),
    ({"wandb": {"project": " "}}, r"train\.wandb\.project: must not be empty"),
    ({"profile": {"start_step": 0}}, r"train\.profile\.start_step: must be > 0"),
    ({"profile": {"start_step": 9, "steps": 3}}, r"train\.profile\.steps: the profile would end at step 11, "
                                                   r"past train\.train_steps 10"),
    ({"profile": {"start_step": 2}, "save_dir": None}, r"train\.profile\.dir: needed without train\.save_dir"),
    ({"profile": {"dir": "x"}}, r"train\.profile\.dir: given without train\.profile\.start_step"),
    ({"profile": {"steps": "two", "start_step": 1}}, r"train\.profile\.steps: expected an integer"),
]


@pytest.mark.parametrize("train, message", BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD])
def test_bad_tracking_config_is_one_line_naming_the_key(train, message):
    raw = {"train": {"train_steps": 10, "save_dir": "runs/x", **train}}
    with pytest.raises(ConfigError, match=message) as e:
        validate(config_from_dict(raw), check_paths=False)
    assert "\n" not in str(e.value)


def test_good_tracking_config_validates_and_wandb_off_by_default():
    cfg = config_from_dict({"train": {"train_steps": 10, "save_dir": "runs/x", "profile": {"start_step": 9, "steps": 2},
                                      "wandb": {"project": "p", "mode": "disabled"}}})
    validate(cfg, check_paths=False)
    from megalong.train.wandb_log import wandb_enabled

    assert not wandb_enabled(cfg) and not wandb_enabled(config_from_dict({}))


def test_wandb_without_the_package_is_a_config_error_before_the_run(tiny_data, tmp_path, monkeypatch):
    import importlib.util as util

    from megalong.config import load_config
    from megalong.preflight import check_train_inputs

    args = tiny_overrides(tiny_data, tmp_path, 5, **{"train.wandb": "{project: p, mode: offline}"})
    cfg = load_config([], [a for a in args if a != "--set"])
    if HAS_WANDB:
        check_train_inputs(cfg)  # passes where wandb is installed
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.wandb\.project: the wandb package is not installed"):
        check_train_inputs(cfg)


def test_top_operators_ranks_self_time_of_the_chosen_device():
    from types import SimpleNamespace

    from megalong.train.profile import top_operators

    events = [SimpleNamespace(key=k, self_cpu_time_total=cpu, self_device_time_total=gpu)
              for k, cpu, gpu in [("a", 500.0, 0.0), ("b", 300.0, 900.0), ("c", 200.0, 100.0), ("d", 0.0, 0.0)]]
    total, top = top_operators(events, on_device=False, n=2)
    assert total == pytest.approx(1e-3) and top == [("a", 0.5), ("b", 0.3)]
    total, top = top_operators(events, on_device=True)
    assert total == pytest.approx(1e-3) and top == [("b", 0.9), ("c", pytest.approx(0.1))]
