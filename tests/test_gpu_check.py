"""bench/gpu_check.sh: its dry run checks, without a GPU, wheels or network, every step of the device
run that a CPU can check; its wheel check names what is missing or built for another Python."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"
PARTS = ["wheels", "tools", "tests_gpu", "attention_kernels", "moe", "train_throughput"]


def _run(*args: str, wheels: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, GPU_CHECK_WHEELS=str(wheels), OMP_NUM_THREADS="1")
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def _summary(out: Path) -> dict[str, int]:
    lines = (out / "summary.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["part", "exit", "seconds", "log"]
    return {name: int(code) for name, code, *_ in (line.split("\t") for line in lines[1:])}


def test_dry_run_checks_every_part_without_gpu_or_wheels(tmp_path):
    out = tmp_path / "out"  # given by $OUT, as on the device
    proc = _run("--dry-run", wheels=tmp_path / "no-wheels", out=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summary(out) == {part: 0 for part in PARTS}
    log = {part: (out / f"{part}.log").read_text() for part in PARTS}
    assert "none in" in log["wheels"] and "--fetch-wheels" in log["wheels"]
    # the real run's arguments, parsed by each script: the rows they would time
    assert "--lengths 8192 32768 --windows 256 1024" in log["attention_kernels"].splitlines()[0]
    assert "would time 22 rows" in log["attention_kernels"]
    assert "FlexAttention window 1024 + ALiBi L=32768" in log["attention_kernels"]
    assert "SDPA causal L=8192" in log["attention_kernels"]
    assert "would time these 8 rows" in log["moe"] and "experts 64, top-2, 16384 tokens, hidden 2048" in log["moe"]
    assert "configs/gpt-neo-125m.yaml" in log["train_throughput"] and "6 rows" in log["train_throughput"]
    assert "layers 12, hidden 768, heads 12" in log["train_throughput"]
    assert "tests collected" in log["tests_gpu"] and "error" not in log["tests_gpu"].lower()
    assert "torch" in (out / "env.txt").read_text()


def test_wheel_check_names_missing_and_wrong_python_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").touch()
    (wheels / "zstandard-0.25.0-cp311-cp311-manylinux2014_x86_64.whl").touch()
    proc = _run("--check-wheels", wheels=wheels)
    assert proc.returncode == 1
    assert "missing pydantic pydantic_core" in proc.stdout and "megatron_core" not in proc.stdout.split("missing")[1]
    assert "not for CPython 3.12: zstandard-0.25.0-cp311" in proc.stdout


def test_without_output_folder_or_with_a_bad_option_it_says_so(tmp_path):
    proc = _run("--dry-run", wheels=tmp_path)
    assert proc.returncode == 2 and "give an output folder" in proc.stderr
    proc = _run("--dry", wheels=tmp_path)
    assert proc.returncode == 2 and "unknown option --dry" in proc.stderr
