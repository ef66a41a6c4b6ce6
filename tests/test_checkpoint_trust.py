"""A checkpoint never runs code, and every broken one is a one-line error: code-carrying pickles
(written here, each would create a marker directory) are refused by export, generate, eval, train
resume and convert through the command line; truncated, garbage, missing and incomplete files
each give `megalong: checkpoint error: <file>: ...` and no traceback; old .pt checkpoints convert
once and resume exactly; RNG states round-trip; `train.keep_last` survives a SIGKILL during its
cleanup; a fresh run never replaces another run's checkpoints."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_cases import error_line, run_cases_in_subprocess
from conftest import REPO, read_metrics, run_cli, tiny_overrides
from megalong.config import load_config
from megalong.parallel.distributed import shutdown
from megalong.checkpoint import step as ckpt
from megalong.checkpoint.native import merged_state
from megalong.checkpoint.files import load_rng, save_rng
from megalong.errors import CheckpointError
from megalong.checkpoint.layout import find_latest
from megalong.train.loop import train
from megalong.checkpoint.layout import complete_checkpoints

DROPOUT = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
DS = {"train.engine": "deepspeed", "deepspeed.zero_stage": 2, "train.micro_batch_size": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


class Payload:
    """Pickles as a call of os.mkdir(marker): what a stranger's checkpoint could carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _args(data, save_dir, steps=2, **extra) -> list[str]:
    return [a for a in tiny_overrides(data, save_dir, steps, **DROPOUT, **extra) if a != "--set"]


def _train(data, save_dir, steps=2, **extra):
    try:
        return train(load_config([], _args(data, save_dir, steps, **extra)))
    finally:
        shutdown()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """run/: megalong's format, steps 1 and 2; meg/: megatron's format; ds/: DeepSpeed's engine."""
    root = tmp_path_factory.mktemp("trusted")
    _train(tiny_data, root / "run", **{"train.save_interval": 1})
    _train(tiny_data, root / "meg", steps=1, **{"train.checkpoint_format": "megatron"})
    run_cli(["train", *tiny_overrides(tiny_data, root / "ds", 1, **DROPOUT, **DS)])
    return root


def _copy(step_dir: Path, root: Path, name: str) -> Path:
    """A copy of step_dir as the only checkpoint of root/name; returns the copied step dir."""
    target = root / name / step_dir.name
    shutil.copytree(step_dir, target)
    return target


def _assert_refused(result: dict, prefix: str) -> None:
    line = error_line(result)
    assert line.startswith(prefix), (prefix, line)


def _write_old_format(step_dir: Path, model_payload=None) -> None:
    """Rewrite a checkpoint as megalong wrote it before format 2 (its torch.save layout)."""
    meta = json.loads((step_dir / "meta.json").read_text())
    groups = meta.pop("optimizer_param_groups")
    meta.pop("format_version")
    model = load_file(step_dir / "model_tp00.safetensors")
    model.update({"output_layer._extra_state": None, "decoder.layers.0.mlp.linear_fc1._extra_state": None})
    torch.save(model if model_payload is None else {"w": model_payload}, step_dir / "model_tp00.pt")
    groups = [{**g, "betas": tuple(g["betas"])} for g in groups]
    torch.save({"state": load_file(step_dir / "optim_tp00.safetensors"), "groups": groups}, step_dir / "optim_tp00.pt")
    load_rng(step_dir / "rng_rank000.safetensors")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               step_dir / "rng_rank000.pt")
    for name in ("model_tp00", "optim_tp00", "rng_rank000"):
        (step_dir / f"{name}.safetensors").unlink()
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _resume(data, step_dir: Path, save_dir: Path, **extra) -> list[str]:
    return ["train", *tiny_overrides(data, save_dir, 3, **DROPOUT, **{"train.load": str(step_dir), **extra})]


def test_code_in_a_checkpoint_never_runs(trained, tiny_data, tmp_path):
    markers = [tmp_path / f"pwned_{i}" for i in range(5)]
    old = _copy(trained / "run" / "step_00000002", tmp_path, "old")
    _write_old_format(old, Payload(markers[0]))
    disguised = _copy(trained / "run" / "step_00000002", tmp_path, "disguised")
    torch.save({"w": Payload(markers[1])}, disguised / "model_tp00.safetensors")
    common = _copy(trained / "meg" / "step_00000001", tmp_path, "common")
    torch.save({"megalong": {"step": 1, "gated_mlp": False}, "w": Payload(markers[2])}, common / "dist" / "common.pt")
    metadata = _copy(trained / "meg" / "step_00000001", tmp_path, "metadata")
    (metadata / "dist" / ".metadata").write_bytes(pickle.dumps(Payload(markers[3])))
    ds = _copy(trained / "ds" / "step_00000001", tmp_path, "ds")
    optim_states = ds / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(markers[4]), "ds_version": "0.19.8"}, optim_states)

    old_format = f"megalong: checkpoint error: {old}: written in the old .pt format"
    refused = "holds a pickle that loading with weights_only=True refuses"
    cases = {  # argv: expected first words of the one error line
        ("generate", str(old), "--prompt", "The"): old_format,
        ("eval", str(old), "--seq-length", "16"): old_format,
        tuple(_resume(tiny_data, old, tmp_path / "r_old")): old_format,
        ("checkpoint", "convert", str(old)): f"megalong: checkpoint error: {old / 'model_tp00.pt'}: {refused}",
        ("export", str(disguised), str(tmp_path / "hf")):
            f"megalong: checkpoint error: {disguised / 'model_tp00.safetensors'}: not a readable safetensors file",
        ("export", str(common), str(tmp_path / "hf")):
            f"megalong: checkpoint error: {common / 'dist' / 'common.pt'}: {refused}",
        tuple(_resume(tiny_data, common, tmp_path / "r_common", **{"train.checkpoint_format": "megatron"})):
            f"megalong: checkpoint error: {common / 'dist' / 'common.pt'}: {refused}",
        ("generate", str(metadata), "--prompt", "The"):
            f"megalong: checkpoint error: {metadata / 'dist' / '.metadata'}: refused to load posix.mkdir",
        tuple(_resume(tiny_data, ds, tmp_path / "r_ds", **DS)):
            f"megalong: checkpoint error: {optim_states}: {refused}",
    }
    results = run_cases_in_subprocess([list(argv) for argv in cases], tmp_path)
    for result, prefix in zip(results, cases.values()):
        _assert_refused(result, prefix)
    # The export of the old checkpoint, through `python -m megalong.cli` itself.
    proc = subprocess.run([sys.executable, "-m", "megalong.cli", "export", str(old), str(tmp_path / "hf")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    _assert_refused({"argv": proc.args, "rc": proc.returncode, "stderr": proc.stderr}, old_format)
    assert not [m for m in markers if m.exists()] and not (tmp_path / "hf").exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _drop_layer_1(path: Path) -> None:
    save_file({k: v for k, v in load_file(path).items() if "layers.1." not in k}, str(path))


def test_each_broken_file_is_a_one_line_error(trained, tiny_data, tmp_path):
    run, meg, ds = (trained / "run" / "step_00000002", trained / "meg" / "step_00000001",
                    trained / "ds" / "step_00000001")
    model = "model_tp00.safetensors"
    # name: (the checkpoint it breaks, how, the file named, what is wrong, the command)
    breakages = {
        "meta_garbage": (run, lambda d: (d / "meta.json").write_bytes(b"\x00{step"), "meta.json", "not valid JSON",
                         "export"),
        "meta_truncated": (run, lambda d: _truncate(d / "meta.json"), "meta.json", "not valid JSON", "generate"),
        "meta_list": (run, lambda d: (d / "meta.json").write_text("[]"), "meta.json", "expected a JSON object", "eval"),
        "meta_no_step": (run, lambda d: _edit_json(d / "meta.json", lambda m: m.pop("step")), "meta.json",
                         "missing key 'step'", "resume"),
        "meta_type": (run, lambda d: _edit_json(d / "meta.json", lambda m: m.update(tensor_parallel="two")),
                      "meta.json", "'tensor_parallel' must be a positive integer, got 'two'", "export"),
        "config_yaml": (run, lambda d: (d / "config.yaml").write_text("model: [unclosed\n"), "config.yaml",
                        "not valid YAML", "export"),
        "config_binary": (run, lambda d: (d / "config.yaml").write_bytes(b"\xff\xfe\x00"), "config.yaml",
                          "not UTF-8 text", "generate"),
        "config_type": (run, lambda d: (d / "config.yaml").write_text(
            (d / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: big")), "config.yaml",
            "model.hidden_size: expected an integer", "resume"),
        "config_missing": (run, lambda d: (d / "config.yaml").unlink(), "config.yaml", "missing", "eval"),
        "model_truncated": (run, lambda d: _truncate(d / model), model, "not a readable safetensors file", "export"),
        "model_garbage": (run, lambda d: (d / model).write_bytes(b"garbage" * 9), model,
                          "not a readable safetensors file", "generate"),
        "model_missing": (run, lambda d: (d / model).unlink(), model, "missing", "resume"),
        "model_incomplete": (run, lambda d: _drop_layer_1(d / model), "", "the model's ['decoder.layers.1",
                             "export"),
        "tokenizer_missing": (run, lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model",
                              "missing: the checkpoint has no tokenizer", "export"),
        "tokenizer_garbage": (run, lambda d: (d / "tokenizer.model").write_bytes(b"garbage"), "tokenizer.model",
                              "not a SentencePiece .model", "eval"),
        "rng_truncated": (run, lambda d: _truncate(d / "rng_rank000.safetensors"), "rng_rank000.safetensors",
                          "not a readable safetensors file", "resume"),
        "optim_missing": (run, lambda d: (d / "optim_tp00.safetensors").unlink(), "optim_tp00.safetensors",
                          "missing", "resume"),
        "dist_metadata": (meg, lambda d: _truncate(d / "dist" / ".metadata"), "dist/.metadata",
                          "not a torch.distributed.checkpoint metadata file", "export"),
        "dist_data": (meg, lambda d: _truncate(d / "dist" / "__0_1.distcp"), "dist/__0_1.distcp", "truncated",
                      "resume_megatron"),
        "dist_common": (meg, lambda d: (d / "dist" / "common.pt").write_bytes(b"garbage"), "dist/common.pt",
                        "cannot be read", "generate"),
        "dist_json": (meg, lambda d: (d / "dist" / "metadata.json").unlink(), "dist/metadata.json", "missing",
                      "export"),
        "ds_truncated": (ds, lambda d: _truncate(d / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                         "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "cannot be read", "resume_ds"),
        "ds_missing": (ds, lambda d: (d / "deepspeed" / "mp_rank_00_model_states.pt").unlink(),
                       "deepspeed/mp_rank_00_model_states.pt", "missing", "resume_ds"),
    }
    cases, prefixes = [], []
    for name, (source, breaks, file, what, command) in breakages.items():
        step_dir = _copy(source, tmp_path, name)
        breaks(step_dir)
        argv = {"export": ["export", str(step_dir), str(tmp_path / f"hf_{name}")],
                "generate": ["generate", str(step_dir), "--prompt", "The"],
                "eval": ["eval", str(step_dir), "--seq-length", "16"],
                "resume": _resume(tiny_data, step_dir, tmp_path / f"r_{name}"),
                "resume_megatron": _resume(tiny_data, step_dir, tmp_path / f"r_{name}",
                                           **{"train.checkpoint_format": "megatron"}),
                "resume_ds": _resume(tiny_data, step_dir, tmp_path / f"r_{name}", **DS)}[command]
        cases.append(argv)
        named = f"{step_dir / file}: " if file else f"{step_dir}: "
        prefixes.append(f"megalong: checkpoint error: {named}{what}")
    for path in (tmp_path / "nowhere", tmp_path / "empty"):
        cases.append(["export", str(path), str(tmp_path / "hf_x")])
    (tmp_path / "empty").mkdir()
    prefixes += [f"megalong: checkpoint error: {tmp_path / 'nowhere'}: no such checkpoint directory",
                 f"megalong: checkpoint error: {tmp_path / 'empty'}: no complete checkpoint there"]
    for result, prefix in zip(run_cases_in_subprocess(cases, tmp_path), prefixes):
        _assert_refused(result, prefix)


def test_old_checkpoint_converts_once_and_resumes_exactly(trained, tiny_data, tmp_path):
    """An old-format step 1, converted (in place, and into a copy), holds the same tensors and
    resumes to the uninterrupted run's step-2 loss exactly (dropout on: the RNG states too)."""
    from megalong.cli import main

    original = trained / "run" / "step_00000001"
    old = _copy(original, tmp_path, "old")
    _write_old_format(old)
    with pytest.raises(CheckpointError, match="written in the old .pt format.*megalong checkpoint convert"):
        ckpt.load_merged_state(old)
    assert main(["checkpoint", "convert", str(old), str(tmp_path / "copy")]) == 0
    assert sorted(p.name for p in old.glob("*.pt")) == ["model_tp00.pt", "optim_tp00.pt", "rng_rank000.pt"]
    assert main(["checkpoint", "convert", str(old.parent)]) == 0  # a save_dir: each old step dir
    assert not list(old.glob("*.pt")) and ckpt.read_checkpoint_info(old).meta["format_version"] == 2
    for name, converted in (("in_place", old), ("copy", tmp_path / "copy")):
        info = ckpt.read_checkpoint_info(converted)
        for prefix in ("model", "optim"):
            mine = merged_state(info, prefix)
            reference = merged_state(ckpt.read_checkpoint_info(original), prefix)
            assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
        resumed = _train(tiny_data, tmp_path / f"resumed_{name}", **{"train.load": str(converted)})
        assert resumed.losses == {2: read_metrics(trained / "run")[2]}


def test_rng_states_round_trip_exactly(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1), np.random.randn()  # cached second normals: gauss_next, has_gauss
    save_rng(tmp_path / "rng.safetensors")

    def draw():
        return (torch.rand(4).tolist(), torch.randn(3).tolist(), [random.random(), random.gauss(0, 1)],
                np.random.randn(3).tolist(), np.random.randint(0, 1 << 30, 3).tolist())

    first = draw()
    load_rng(tmp_path / "rng.safetensors")
    assert draw() == first


def test_keep_last_survives_a_kill_during_cleanup(trained, tiny_data, tmp_path):
    save_dir = tmp_path / "run"
    _train(tiny_data, save_dir, 4, **{"train.save_interval": 1, "train.keep_last": 2})
    assert [p.name for p in complete_checkpoints(save_dir)] == ["step_00000003", "step_00000004"]
    # Resumed from step 4 with keep_last 1, killed while deleting step 3 (rmtree halfway).
    args = tiny_overrides(tiny_data, save_dir, 5, **DROPOUT, **{"train.load": "auto", "train.keep_last": 1})
    script = textwrap.dedent(f"""
        import os, signal, sys
        from megalong.checkpoint import layout
        real_rmtree = layout.shutil.rmtree
        def dying_rmtree(path, *a, **k):
            if not str(path).endswith(".deleting"):
                return real_rmtree(path, *a, **k)
            os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
            os.kill(os.getpid(), signal.SIGKILL)
        layout.shutil.rmtree = dying_rmtree
        from megalong.cli import main
        sys.exit(main(["train", *{args!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(save_dir)] == ["step_00000004", "step_00000005"]
    assert find_latest(save_dir) == save_dir / "step_00000005"
    assert ckpt.load_merged_state(save_dir)[1] and (save_dir / ".step_00000003.deleting").is_dir()
    # The next run (resumed from step 5) removes the remains, and step 4 as keep_last 1 says.
    _train(tiny_data, save_dir, 6, **{"train.load": "auto", "train.keep_last": 1})
    assert sorted(p.name for p in save_dir.iterdir() if "step" in p.name) == ["step_00000005", "step_00000006"]
    # A run resumed explicitly from an older step keeps that one as well.
    _train(tiny_data, save_dir, 7, **{"train.load": str(save_dir / "step_00000005"), "train.keep_last": 1,
                                      "train.save_interval": 1})
    assert [p.name for p in complete_checkpoints(save_dir)] == ["step_00000005", "step_00000007"]


def test_a_fresh_run_never_replaces_another_runs_checkpoints(trained, tiny_data, tmp_path):
    step_dir = _copy(trained / "run" / "step_00000002", tmp_path, "run")
    save_dir = step_dir.parent
    before = (step_dir / "model_tp00.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"already holds 1 checkpoint\(s\) of another run "
                                                   r"\(step_00000002\).*train.overwrite: true"):
        _train(tiny_data, save_dir, 1)
    assert (step_dir / "model_tp00.safetensors").read_bytes() == before
    assert not (save_dir / "data_cache").exists()  # refused before the datasets were built
    resumed = _train(tiny_data, save_dir, 3, **{"train.load": "auto"})  # continuing it is fine
    assert sorted(resumed.losses) == [3]
    replaced = _train(tiny_data, save_dir, 1, **{"train.overwrite": "true"})
    assert [p.name for p in complete_checkpoints(save_dir)] == ["step_00000001"]
    assert replaced.checkpoint == save_dir / "step_00000001"
    assert sorted(read_metrics(save_dir)) == [1]  # the replaced run's record went with it


def test_library_pickles_are_read_without_code(tmp_path, monkeypatch):
    """Without megalong's guard, megatron's and DeepSpeed's readers would run the payload (shown
    here); inside it they refuse, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from torch.distributed.checkpoint import FileSystemReader

    from megalong.train.library_loads import deepspeed_safe_globals, pickles_without_code

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"w": Payload(marker)}, tmp_path / "common.pt")
    reads = [lambda: FileSystemReader(str(tmp_path)).read_metadata(),
             lambda: torch.load(tmp_path / "common.pt"),  # megatron-core's common.pt read
             lambda: TorchCheckpointEngine(None).load(str(tmp_path / "common.pt"))]
    for read in reads:
        with pytest.raises(pickle.UnpicklingError), pickles_without_code(deepspeed_safe_globals()):
            read()
        assert not marker.exists()
        with contextlib.suppress(Exception):
            read()  # unguarded: the payload runs (then the reader may fail on what it returned)
        assert marker.is_dir()
        marker.rmdir()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the guard put the environment back
