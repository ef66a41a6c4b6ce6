"""The CLI imports what a command needs when it runs: `--help`, every command's `--help` and the
data commands (tokenizer, preprocess, data inspect/merge) never import torch, megatron-core,
transformers, DeepSpeed, Triton, W&B or matplotlib (`megalong plot` imports matplotlib only).
Each command runs through `megalong.cli.main` in a fresh interpreter, which then lists the heavy
modules it holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "megatron", "transformers", "deepspeed", "triton", "wandb", "matplotlib")

RUN = """
import json, sys
from megalong.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _run(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


HELP = [[], ["train"], ["demo"], ["preprocess"], ["tokenizer"], ["tokenizer", "train"], ["data"],
        ["data", "inspect"], ["data", "merge"], ["checkpoint"], ["checkpoint", "convert"], ["export"],
        ["generate"], ["eval"], ["plot"]]


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "megalong")
def test_help_imports_no_heavy_library(command):
    result = _run([*command, "--help"])
    assert result == {"code": 0, "heavy": []}


def test_data_commands_import_no_heavy_library(tiny_data, tmp_path):
    """They run (and do their work), without torch, megatron-core, transformers, DeepSpeed, Triton."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "some words here " * (i % 7 + 1)}) + "\n"
                              for i in range(200)))
    commands = {
        "tokenizer": ["tokenizer", "train", "--input", str(corpus), "--model-prefix", str(tmp_path / "spm"),
                      "--vocab-size", "300"],
        "preprocess": ["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "p"),
                       "--tokenizer-model", tiny_data.tokenizer, "--workers", "1"],
        "inspect": ["data", "inspect", str(tmp_path / "p")],
        "merge": ["data", "merge", "--input", str(tmp_path / "p"), tiny_data.prefix,
                  "--output-prefix", str(tmp_path / "m")],
    }
    for name, argv in commands.items():
        assert _run(argv) == {"code": 0, "heavy": []}, name
    assert (tmp_path / "spm.model").is_file()
    assert (tmp_path / "p.bin").is_file() and (tmp_path / "m.idx").is_file()


def test_plot_imports_matplotlib_only(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 5.0 / s}) + "\n"
                                                    for s in range(1, 6)))
    result = _run(["plot", str(tmp_path), "-o", str(tmp_path / "p.png")])
    assert result == {"code": 0, "heavy": ["matplotlib"]} and (tmp_path / "p.png").is_file()


def test_a_model_command_still_loads_its_libraries_when_it_runs(tmp_path):
    """The counter-check: the lazy imports happen at run time (an export of a missing checkpoint
    imports the checkpoint code, torch included, then fails with megalong's one-line error)."""
    result = _run(["export", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result["code"] == 2 and "torch" in result["heavy"]
