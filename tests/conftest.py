"""Shared fixtures: a small real corpus (the standard library's docs), its tokenizer and .bin/.idx."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Without CUDA, Triton kernels can only run interpreted (tests/test_kernels.py). Triton reads this
# when it is imported (megatron-core imports it), so it is set here, before any test module loads.
# On a CPU-only machine it changes nothing else: a compiled Triton kernel cannot run there at all.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@dataclass(frozen=True)
class TinyData:
    tokenizer: str
    prefix: str


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    from megalong.data.preprocess import PreprocessOptions, preprocess
    from megalong.data.stdlib_corpus import build_stdlib_corpus
    from megalong.data.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "docs.jsonl.zst"
    build_stdlib_corpus(corpus, max_docs=120)
    train_sentencepiece([str(corpus)], str(root / "spm"), vocab_size=512, model_type="bpe")
    preprocess(PreprocessOptions([str(corpus)], str(root / "docs"), str(root / "spm.model"), workers=1))
    return TinyData(tokenizer=str(root / "spm.model"), prefix=str(root / "docs"))


def tiny_overrides(data: TinyData, save_dir: Path, steps: int = 5, **extra) -> list[str]:
    """--set overrides for a small, fast GPT-Neo-shaped run on the tiny corpus."""
    values = {
        "data.tokenizer": data.tokenizer,
        "data.train": f"[{data.prefix}]",
        "data.split": "90,10,0",
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.max_position_embeddings": 64,
        "model.attention_layers": '[[["global", "local"], 1]]',
        "model.attention": "{local: {window: 8}}",
        "model.scale_attention": "false",
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.train_steps": steps,
        "train.warmup_steps": 2,
        "train.log_interval": 1,
        "train.eval_interval": 1000,
        "train.eval_iters": 1,
        "train.progress_bar": "false",
        "train.save_dir": str(save_dir),
        **extra,
    }
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
            launcher: str = "python") -> subprocess.CompletedProcess:
    """Run `megalong ...` as one process, or under torchrun with `nproc` gloo processes."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    if launcher == "torchrun.sh":
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc", str(nproc), *args[1:]]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "megalong.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "megalong.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_script(script: str, nproc: int, timeout: int = 600) -> str:
    """tests/<script> as one torchrun job of `nproc` gloo processes; its stdout (the test fails
    with the tail of both streams when the job does)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(REPO / "tests" / script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return proc.stdout


def run_driver(runs: list[list[str]], nproc: int, tmp_path: Path) -> None:
    """Several training configs (lists of `key=value` overrides) one after another in one torchrun
    job of `nproc` gloo processes (tests/parallel_driver.py)."""
    import json

    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(REPO / "tests" / "parallel_driver.py"), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]


def train_here(args: list[str]):
    """Train one process inside pytest (no spawn, megatron already imported): `args` are
    `key=value` overrides. One thread, like the torchrun processes: with the default two on a busy
    2-core machine, OpenMP's waiting threads made these tiny runs 20-40x slower."""
    import torch

    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config([], args))
    finally:
        shutdown()
        torch.set_num_threads(threads)


def overrides(data: TinyData, save_dir: Path, steps: int = 5, **extra) -> list[str]:
    """tiny_overrides as `key=value` items (no "--set"), for train_here and run_driver."""
    return [a for a in tiny_overrides(data, save_dir, steps, **extra) if a != "--set"]


def read_metrics(save_dir: Path, key: str = "train/loss") -> dict[int, float]:
    import json

    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out
