"""A table of bad inputs, each run through the real command line, each with the one line it must
print: `megalong: <kind> error: <message>` naming the key, option, file or line, exit status 2, no
Python traceback, and (where a case says so) nothing lost or left behind.

Most cases call `megalong.cli.main(argv)` in this process through tests/cli_cases.py's run_case
(fast: one import of megatron-core for all of them); the launcher cases run the scripts in
`launch/` as subprocesses, with `--dry-run` where the error must come before anything starts.

To add a case, append a `Case` to CASES: `argv` is the command line after `megalong` (or after the
launcher script), with `{tmp}` (the case's own empty directory), `{tok}` (a SentencePiece model),
`{data}` (a .bin/.idx prefix), `{corpus}` (a .jsonl.zst corpus) and `{ckpt}` (a trained checkpoint)
filled in; `setup(env)` writes the files the case needs; `kind` and `message` (a regex searched in
the text after `megalong: <kind> error: `) are what must be printed; `after(env)` checks what is
left on disk.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from cli_cases import error_line, run_case
from conftest import REPO, TinyData, free_port, tiny_overrides
from megalong.data.corpus import write_jsonl_zst

FAKE_SLURM = REPO / "tests" / "fake_slurm"


@dataclass
class Env:
    tmp: Path
    data: TinyData
    corpus: str
    ckpt: Optional[Path] = None

    def fill(self, arg: str) -> str:
        for name, value in (("tmp", self.tmp), ("tok", self.data.tokenizer), ("data", self.data.prefix),
                            ("corpus", self.corpus), ("ckpt", self.ckpt)):
            arg = arg.replace("{" + name + "}", str(value))
        return arg


@dataclass
class Case:
    id: str
    argv: list[str] | Callable[[Env], list[str]]
    kind: Optional[str]  # None: the command must succeed (rc 0)
    message: str = ""
    setup: Optional[Callable[[Env], None]] = None
    after: Optional[Callable[[Env], None]] = None
    via: str = "cli"  # or a script of launch/, run as a subprocess
    patch: Optional[Callable[[pytest.MonkeyPatch, Env], None]] = None  # in-process only
    launch_env: dict = field(default_factory=dict)


# ---- helpers that write bad files ----------------------------------------------------------------

def write(name: str, content: bytes | str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def both(*setups: Callable[[Env], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        for s in setups:
            s(env)
    return setup


def dataset(damage: Callable[[Path, Path], None]) -> Callable[[Env], None]:
    """A copy of the tiny dataset as {tmp}/d.bin/.idx, then `damage(bin, idx)`."""
    def setup(env: Env) -> None:
        for suffix in (".bin", ".idx"):
            shutil.copy(env.data.prefix + suffix, env.tmp / f"d{suffix}")
        damage(env.tmp / "d.bin", env.tmp / "d.idx")
    return setup


def patch_bytes(offset: int, data: bytes) -> Callable[[Path, Path], None]:
    def damage(_bin: Path, idx: Path) -> None:
        raw = bytearray(idx.read_bytes())
        raw[offset:offset + len(data)] = data
        idx.write_bytes(bytes(raw))
    return damage


def truncate(which: str, by: int) -> Callable[[Path, Path], None]:
    def damage(bin_: Path, idx: Path) -> None:
        path = bin_ if which == "bin" else idx
        os.truncate(path, path.stat().st_size - by)
    return damage


def append_to_bin(bin_: Path, _idx: Path) -> None:
    with open(bin_, "ab") as f:
        f.write(b"\0\0")


def copy_tokenizer(name: str, keep_fraction: float = 1.0) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        data = Path(env.data.tokenizer).read_bytes()
        (env.tmp / name).write_bytes(data[: int(len(data) * keep_fraction)])
    return setup


def checkpoint_copy(damage: Callable[[Path], None]) -> Callable[[Env], None]:
    """A copy of the trained checkpoint's step directory as {tmp}/ck, then `damage(step_dir)`."""
    def setup(env: Env) -> None:
        shutil.copytree(env.ckpt, env.tmp / "ck")
        damage(env.tmp / "ck")
    return setup


def lines(*records: str) -> str:
    return "".join(r + "\n" for r in records)


def nothing_in(*names: str) -> Callable[[Env], None]:
    def after(env: Env) -> None:
        left = sorted(p.name for p in env.tmp.iterdir() if p.name not in names)
        assert not left, f"left behind: {left}"
    return after


def train(env_extra: dict | None = None, *more: str) -> Callable[[Env], list[str]]:
    """`megalong train` of a tiny config on the tiny data, saving into {tmp}/run."""
    def argv(env: Env) -> list[str]:
        return ["train", *tiny_overrides(env.data, env.tmp / "run", 2, **(env_extra or {})), *more]
    return argv


def no_space(monkeypatch: pytest.MonkeyPatch, env: Env) -> None:
    """Writes of the dataset writer fail as on a full disk (ENOSPC)."""
    import megalong.data.indexed as indexed

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    real_open = open
    monkeypatch.setattr(indexed, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)


def symlink_to_dev_full(name: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        (env.tmp / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/full", env.tmp / name)
    return setup


def preprocess(*extra: str, input: str = "{tmp}/c.jsonl", output: str = "{tmp}/out") -> list[str]:
    return ["preprocess", "--input", input, "--output-prefix", output, "--tokenizer-model", "{tok}",
            "--workers", "1", *extra]


def tokenizer_train(*extra: str, input: str = "{tmp}/c.jsonl", prefix: str = "{tmp}/tok/spm") -> list[str]:
    return ["tokenizer", "train", "--input", input, "--model-prefix", prefix, "--vocab-size", "300", *extra]


def small_corpus(bad_line: str | None = None, n: int = 40) -> str:
    docs = [f'{{"text": "document number {i} about the quick brown fox and the lazy dog"}}' for i in range(n)]
    if bad_line is not None:
        docs.insert(1, bad_line)
    return lines(*docs)


def _short_npy() -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.arange(1000, dtype=np.int64))
    return buffer.getvalue()[:-8]


SURROGATE = '{"text": "a lone \\ud800 surrogate"}'
IDX = 9  # bytes of the magic; the version follows (8 bytes), then the dtype code (1 byte)


def empty_twice(env: Env) -> None:
    """An empty corpus is refused without leaving a shard or a done record, so the same command
    run again refuses it again instead of accepting it as done."""
    from megalong.cli import main

    assert sorted(p.name for p in env.tmp.iterdir()) == ["c.jsonl"]
    assert main([env.fill(a) for a in preprocess()]) == 2


def skipped_and_counted(env: Env) -> None:
    import json

    record = json.loads((env.tmp / "out.done.json").read_text())
    assert record["stats"]["bad_lines"] == 1 and record["stats"]["documents"] == 40
    assert "lone surrogate" in record["stats"]["bad_examples"][0]


def saved_nothing(env: Env) -> None:
    assert not (env.tmp / "run").exists() or not list((env.tmp / "run").glob("step_*"))


# ---- checkpoints and caches from a stranger --------------------------------------------------------

class Payload:
    """Pickles as a call of os.mkdir(marker): what a stranger's file could carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def never_ran(env: Env) -> bool:
    return not (env.tmp / "pwned").exists()


def old_pt_checkpoint_with_code(step_dir: Path) -> None:
    """The checkpoint as megalong wrote it before format 2 (no format_version, pickled .pt files),
    its model file a pickle that would create {tmp}/pwned when unpickled."""
    import torch

    meta = json.loads((step_dir / "meta.json").read_text())
    meta.pop("format_version")
    (step_dir / "meta.json").write_text(json.dumps(meta))
    (step_dir / "model_tp00.safetensors").unlink()
    torch.save({"decoder.layers.0.mlp.linear_fc1.weight": Payload(step_dir.parent / "pwned")},
               step_dir / "model_tp00.pt")


def still_old(env: Env) -> bool:
    d = env.tmp / "ck"
    return (never_ran(env) and (d / "model_tp00.pt").is_file()
            and "format_version" not in json.loads((d / "meta.json").read_text()))


def previous_run(env: Env) -> None:
    """{tmp}/run holds another run's complete checkpoint (a copy of the trained one)."""
    shutil.copytree(env.ckpt, env.tmp / "run" / env.ckpt.name)


def previous_run_intact(env: Env) -> bool:
    step_dir = env.tmp / "run" / env.ckpt.name
    return (step_dir / "meta.json").is_file() and (step_dir / "model_tp00.safetensors").read_bytes() == \
        (env.ckpt / "model_tp00.safetensors").read_bytes()


def cache_file(name: str, content: Callable[[Env], bytes | object]) -> Callable[[Env], None]:
    """A file of the dataset index cache {tmp}/run/data_cache/<digest>/ (content: bytes, or an
    array for numpy.save)."""
    def setup(env: Env) -> None:
        import numpy as np

        path = env.tmp / "run" / "data_cache" / "0123456789abcdef" / name
        path.parent.mkdir(parents=True)
        value = content(env)
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            np.save(path, value, allow_pickle=True)
    return setup


def object_array(env: Env):
    import numpy as np

    array = np.empty(2, dtype=object)
    array[0] = Payload(env.tmp / "pwned")
    return array


CASES: list[Case] = [
    # ---- config files and --set -------------------------------------------------------------------
    Case("config-binary", ["train", "{tmp}/c.yaml"], "config", r"c\.yaml: not a text file \(not UTF-8 at byte 2\)",
         write("c.yaml", b"\x00\x01\xff\xfe")),
    Case("config-nul-bytes", ["train", "{tmp}/c.yaml"], "config", r"c\.yaml: not a text file \(it holds NUL bytes\)",
         write("c.yaml", b"train:\x00\n")),
    Case("config-idx-given-as-config", ["train", "{data}.idx"], "config", r"docs\.idx: not a text file"),
    Case("config-too-large", ["train", "{tmp}/c.yaml"], "config", r"c\.yaml: 17,825,792 bytes is not a config file",
         lambda env: os.truncate(env.tmp / "c.yaml", 17 << 20) if (env.tmp / "c.yaml").touch() is None else None),
    Case("config-not-a-mapping", ["train", "{tmp}/c.yaml"], "config",
         r"c\.yaml: the top level must be a mapping of sections .* got list", write("c.yaml", "- a\n- b\n")),
    Case("config-scalar", ["train", "{tmp}/c.yaml"], "config", r"c\.yaml: the top level must be a mapping .* got int",
         write("c.yaml", "42\n")),
    Case("config-invalid-yaml", ["train", "{tmp}/c.yaml"], "config",
         r"c\.yaml: not valid YAML: mapping values are not allowed here at line 3, column 8",
         write("c.yaml", "model:\n  num_layers: 2\n    bad: indent\n")),
    Case("config-key-twice", ["train", "{tmp}/c.yaml"], "config", r"c\.yaml: line 3: key 'lr' is given twice",
         write("c.yaml", "train:\n  lr: 1.0e-3\n  lr: 3.0e-4\n")),
    Case("config-is-a-directory", ["train", "{tmp}"], "config", r": is a directory, not a YAML config file$"),
    Case("config-is-a-checkpoint", ["train", "{ckpt}"], "config",
         r"step_00000002: is a directory, not a YAML config file \(a checkpoint\? resume it with --set train\.load="),
    Case("config-missing", ["train", "{tmp}/nope.yaml"], "config", r"config file not found: .*nope\.yaml"),
    Case("config-section-not-a-mapping", ["train", "{tmp}/c.yaml"], "config", r"^train: expected a mapping, got 5",
         write("c.yaml", "train: 5\n")),
    Case("config-unknown-key", ["train", "--set", "train.warmup=3"], "config",
         r"unknown config key 'train\.warmup'; did you mean 'warmup_steps'\?"),
    Case("config-tokenizer-json-as-config", ["train", "{tmp}/tokenizer.json"], "config",
         r"unknown config key 'version'", write("tokenizer.json", '{"version": "1.0", "model": {}}')),
    Case("set-without-equals", ["train", "--set", "train.lr"], "config", r"override 'train\.lr': expected KEY=VALUE"),
    Case("set-invalid-yaml", ["train", "--set", "train.lr=[1"], "config",
         r"override 'train\.lr=\[1': the value is not valid YAML \(expected ',' or '\]'"),
    Case("set-empty-key", ["train", "--set", "=3"], "config", r"override '=3': expected a dotted key"),
    Case("set-empty-key-part", ["train", "--set", "train..lr=3"], "config", r"override 'train\.\.lr=3': expected a dotted key"),
    Case("set-key-twice", ["train", "--set", "model.attention={local: {window: 1}, local: {window: 2}}"], "config",
         r"override 'model\.attention=.*': line 1: key 'local' is given twice"),
    Case("set-wrong-type", ["train", "--set", "train.lr=fast"], "config", r"train\.lr: expected a number, got 'fast'"),
    # ---- keys that moved to the execution section: the one line names the new place --------------
    Case("moved-model-kernels", train({"model.kernels": "reference"}), "config",
         r"^model\.kernels moved to execution\.kernels$"),
    Case("moved-model-loss-chunks", ["train", "--set", "model.loss_chunks=2"], "config",
         r"^model\.loss_chunks moved to execution\.loss_chunks$"),
    Case("moved-model-recompute", ["train", "{tmp}/c.yaml"], "config",
         r"^model\.recompute_granularity moved to execution\.recompute_granularity$",
         write("c.yaml", "model:\n  recompute_granularity: selective\n")),
    Case("moved-train-precision", train({"train.precision": "bf16"}), "config",
         r"^train\.precision moved to execution\.precision$"),
    Case("moved-train-compile", ["train", "--set", "train.compile=true"], "config",
         r"^train\.compile moved to execution\.compile$"),
    Case("execution-loss-chunks-not-dividing", train({"execution.loss_chunks": 3}), "config",
         r"execution\.loss_chunks: 3 does not divide the sequence length"),
    Case("execution-unknown-key", ["train", "--set", "execution.kernel=reference"], "config",
         r"unknown config key 'execution\.kernel'; did you mean 'kernels'\?"),
    # ---- config values: optimizer and schedule ---------------------------------------------------
    Case("adam-beta1-one", train({"train.adam_beta1": 1.0}), "config", r"train\.adam_beta1: must be in \[0, 1\), got 1\.0"),
    Case("adam-beta2-negative", train({"train.adam_beta2": -0.1}), "config", r"train\.adam_beta2: must be in \[0, 1\), got -0\.1"),
    Case("adam-eps-zero", train({"train.adam_eps": 0}), "config", r"train\.adam_eps: must be > 0, got 0"),
    Case("weight-decay-negative", train({"train.weight_decay": -0.1}), "config", r"train\.weight_decay: must be >= 0, got -0\.1"),
    Case("weight-decay-flips-weights", train({"train.lr": 20, "train.min_lr": 0}), "config",
         r"train\.weight_decay: train\.lr x train\.weight_decay = 2 >= 1"),
    Case("grad-clip-negative", train({"train.grad_clip": -1}), "config", r"train\.grad_clip: must be >= 0, got -1"),
    Case("min-lr-negative", train({"train.min_lr": -1e-4}), "config", r"train\.min_lr: must be >= 0"),
    Case("lr-nan", train({"train.lr": ".nan"}), "config", r"train\.lr: expected a finite number, got nan"),
    Case("lr-inf", train({"train.lr": ".inf"}), "config", r"train\.lr: expected a finite number, got inf"),
    Case("lr-decay-shorter-than-warmup", train({"train.lr_decay_steps": 1}), "config",
         r"train\.lr_decay_steps: 1 is shorter than train\.warmup_steps 2"),
    Case("stop-after-the-end", train({"train.stop_at_step": 9}), "config", r"train\.stop_at_step: 9 is past train\.train_steps 2"),
    Case("max-skipped-zero", train({"train.max_skipped_steps": 0}), "config", r"train\.max_skipped_steps: must be > 0"),
    Case("nonfinite-unknown", train({"train.nonfinite": "ignore"}), "config",
         r"train\.nonfinite: must be one of 'stop', 'skip', got 'ignore'"),
    Case("seed-negative", train({"train.seed": -1}), "config", r"train\.seed: must be in \[0, 2\^31\), got -1"),
    Case("skip-with-zero3", train({"train.engine": "deepspeed", "deepspeed.zero_stage": 3, "train.nonfinite": "skip"}),
         "config", r"train\.nonfinite: skip is not supported with deepspeed\.zero_stage 3"),
    # ---- config values: data, model, MoE, README restrictions -------------------------------------
    Case("split-nan", train({"data.split": "nan,1,1"}), "config", r"data\.split: expected three comma-separated shares"),
    Case("split-exponent", train({"data.split": "1e3,1,0"}), "config", r"data\.split: expected three comma-separated shares"),
    Case("split-zero", train({"data.split": "0,0,0"}), "config", r"data\.split: the shares add up to 0"),
    Case("data-path-with-suffix", train({"data.train": "[{data}.idx]"}), "config",
         r"data\.train\[0\]\.path: give the \.bin/\.idx prefix without the suffix: .*docs, not .*docs\.idx"),
    Case("tokenizer-json-for-training", train({"data.tokenizer": "{tmp}/tokenizer.json"}), "config",
         r"data\.tokenizer: .*tokenizer\.json looks like a Hugging Face tokenizer\.json"),
    Case("fam-with-axial-positions-trains", train({"model.attention_layers": "[[[fam], 2]]", "model.attention": "{fam: {block_size: 16}}",
                                                   "model.position_embedding": "axial", "model.axial_position": "{shape: [8, 8]}"}),
         None, after=lambda env: (env.tmp / "run" / "step_00000002" / "meta.json").is_file()),
    Case("fam-with-rope", train({"model.attention_layers": "[[[fam], 2]]", "model.attention": "{fam: {block_size: 16}}",
                                 "model.position_embedding": "rope"}),
         "config", r"model\.position_embedding: fam layers do not support rope; use learned, axial, none or ALiBi"),
    Case("moe-aux-loss-negative", train({"model.mlp_layers": "[[[moe], 2]]", "model.moe": "{num_experts: 2, aux_loss_coeff: -0.1}"}),
         "config", r"model\.moe\.aux_loss_coeff: must be >= 0, got -0\.1"),
    Case("moe-z-loss-negative", train({"model.mlp_layers": "[[[moe], 2]]", "model.moe": "{num_experts: 2, z_loss_coeff: -1}"}),
         "config", r"model\.moe\.z_loss_coeff: must be >= 0, got -1"),
    Case("moe-capacity-nan", train({"model.mlp_layers": "[[[moe], 2]]", "model.moe": "{num_experts: 2, capacity_factor: .nan}"}),
         "config", r"model\.moe\.capacity_factor: expected a finite number, got nan"),
    Case("rope-base-one", train({"model.position_embedding": "rope", "model.rotary_base": 1}), "config",
         r"model\.rotary_base: must be > 1"),
    Case("vocab-smaller-than-tokenizer", train({"model.vocab_size": 100}), "config",
         r"model\.vocab_size: 100 is smaller than the 512 pieces of data\.tokenizer"),
    Case("layout-for-world-size", train({}, "--check-config", "--world-size", "3"), "config",
         r"train\.global_batch_size: 4 is not a multiple of train\.micro_batch_size x data-parallel size = 2 x 3"),
    Case("check-config-ok", train({}, "--check-config"), None),
    Case("configs-after-set", lambda env: ["train", "{tmp}/a.yaml", "--set", "train.lr=1e-3", "{tmp}/b.yaml",
                                           *tiny_overrides(env.data, env.tmp / "run", 2), "--check-config"], None,
         setup=both(write("a.yaml", "train: {lr: 2.0e-3}\n"), write("b.yaml", "train: {min_lr: 0.0}\n"))),
    # ---- tokenizer files ---------------------------------------------------------------------------
    Case("train-tokenizer-garbage", train({"data.tokenizer": "{tmp}/bad.model"}), "tokenizer",
         r"data\.tokenizer: .*bad\.model: not a SentencePiece \.model \(it cannot be parsed", write("bad.model", os.urandom(64))),
    Case("train-tokenizer-truncated", train({"data.tokenizer": "{tmp}/half.model"}), "tokenizer",
         r"data\.tokenizer: .*half\.model: not a SentencePiece \.model", copy_tokenizer("half.model", 0.5),
         after=saved_nothing),
    Case("train-tokenizer-empty", train({"data.tokenizer": "{tmp}/empty.model"}), "tokenizer",
         r"data\.tokenizer: .*empty\.model: not a SentencePiece \.model", write("empty.model", b"")),
    Case("train-tokenizer-is-json", train({"data.tokenizer": "{tmp}/tok.model"}), "tokenizer",
         r"tok\.model: a JSON file \(a Hugging Face tokenizer\.json\?\), not a SentencePiece \.model",
         write("tok.model", '{"version": "1.0"}')),
    Case("train-tokenizer-missing", train({"data.tokenizer": "{tmp}/none.model"}), "config", r"data\.tokenizer: file not found"),
    Case("preprocess-tokenizer-garbage", ["preprocess", "--input", "{tmp}/c.jsonl", "--output-prefix", "{tmp}/out",
                                          "--tokenizer-model", "{tmp}/bad.model"], "tokenizer",
         r"bad\.model: not a SentencePiece \.model", both(write("c.jsonl", small_corpus()), write("bad.model", b"hello")),
         after=nothing_in("c.jsonl", "bad.model")),
    Case("preprocess-tokenizer-json-garbage", ["preprocess", "--input", "{tmp}/c.jsonl", "--output-prefix", "{tmp}/out",
                                               "--tokenizer-model", "{tmp}/tokenizer.json"], "tokenizer",
         r"tokenizer\.json: not a Hugging Face tokenizer\.json \(", both(write("c.jsonl", small_corpus()),
                                                                        write("tokenizer.json", '{"version": '))),
    Case("preprocess-tokenizer-directory", ["preprocess", "--input", "{tmp}/c.jsonl", "--output-prefix", "{tmp}/out",
                                            "--tokenizer-model", "{tmp}"], "config",
         r"--tokenizer-model\): .* is a directory, not a tokenizer file", write("c.jsonl", small_corpus())),
    Case("inspect-tokenizer-garbage", ["data", "inspect", "{data}", "--tokenizer-model", "{tmp}/bad.model"], "tokenizer",
         r"bad\.model: not a SentencePiece \.model", write("bad.model", os.urandom(32))),
    Case("export-checkpoint-without-tokenizer", ["export", "{tmp}/ck", "{tmp}/hf"], "checkpoint",
         r"ck/tokenizer\.model: missing: the checkpoint has no tokenizer",
         checkpoint_copy(lambda d: (d / "tokenizer.model").unlink()), after=nothing_in("ck")),
    Case("generate-checkpoint-tokenizer-garbage", ["generate", "{tmp}/ck", "--prompt", "x"], "checkpoint",
         r"ck/tokenizer\.model: not a SentencePiece \.model",
         checkpoint_copy(lambda d: (d / "tokenizer.model").write_bytes(b"\x08junk"))),
    # ---- checkpoints (tests/test_checkpoint_trust.py has every file of every format) -----------------
    Case("export-old-pt-checkpoint-with-code", ["export", "{tmp}/ck", "{tmp}/hf"], "checkpoint",
         r"ck: written in the old \.pt format .*convert it once with `megalong checkpoint convert .*ck` if you trust",
         checkpoint_copy(old_pt_checkpoint_with_code), after=lambda env: never_ran(env) and not (env.tmp / "hf").exists()),
    Case("convert-old-pt-checkpoint-with-code", ["checkpoint", "convert", "{tmp}/ck"], "checkpoint",
         r"ck/model_tp00\.pt: holds a pickle that loading with weights_only=True refuses \(it would call posix\.mkdir\)",
         checkpoint_copy(old_pt_checkpoint_with_code), after=still_old),
    Case("export-checkpoint-without-meta", ["export", "{tmp}/ck", "{tmp}/hf"], "checkpoint",
         r"ck: no complete checkpoint there \(expected meta\.json", checkpoint_copy(lambda d: (d / "meta.json").unlink())),
    Case("generate-checkpoint-model-garbage", ["generate", "{tmp}/ck", "--prompt", "x"], "checkpoint",
         r"ck/model_tp00\.safetensors: not a readable safetensors file",
         checkpoint_copy(lambda d: (d / "model_tp00.safetensors").write_bytes(b"\x00garbage" * 8))),
    Case("eval-config-given-as-checkpoint", ["eval", "configs/tiny-cpu.yaml", "--seq-length", "16"], "checkpoint",
         r"configs/tiny-cpu\.yaml: a file, not a checkpoint directory"),
    Case("train-load-checkpoint-missing", train({"train.load": "{tmp}/nothing"}), "checkpoint",
         r"nothing: no such checkpoint directory", after=saved_nothing),
    Case("train-into-another-runs-checkpoint", train(), "checkpoint",
         r"run: already holds 1 checkpoint\(s\) of another run \(step_00000002\), which this run would replace; "
         r"resume them with train\.load: auto", previous_run, after=previous_run_intact),
    Case("overwrite-checkpoint-only-after-every-check", train({"train.overwrite": "true", "data.train": "[{tmp}/d]"}),
         "dataset", r"d\.idx: .*truncated", both(previous_run, dataset(truncate("idx", 8))), after=previous_run_intact),
    # ---- the dataset index cache megatron-core unpickles ------------------------------------------
    Case("data-cache-pickle", train(), "dataset",
         r"data_cache/0123456789abcdef/x-document_index\.npy: not a \.npy array file .*numpy would load it as a "
         r"pickle, which can run code: refused",
         cache_file("x-document_index.npy", lambda env: pickle.dumps(Payload(env.tmp / "pwned"))), after=never_ran),
    Case("data-cache-object-array", train({"data.cache_dir": "{tmp}/run/data_cache"}), "dataset",
         r"x-sample_index\.npy: holds Python objects \(dtype object\), which numpy would unpickle",
         cache_file("x-sample_index.npy", object_array), after=never_ran),
    Case("data-cache-truncated", train(), "dataset", r"x-shuffle_index\.npy: 8,120 bytes, but its header \(int64 \(1000,\)\) "
         r"needs 8,128: truncated", cache_file("x-shuffle_index.npy", lambda env: _short_npy())),
    # ---- .bin/.idx datasets ------------------------------------------------------------------------
    Case("idx-bad-magic", train({"data.train": "[{tmp}/d]"}), "dataset",
         r"data\.train\[0\]\.path: .*d\.idx: not a megatron \.idx file", dataset(patch_bytes(0, b"NOTMAGIC!")),
         after=saved_nothing),
    Case("idx-version", train({"data.train": "[{tmp}/d]"}), "dataset", r"d\.idx: \.idx version 2; megatron-core's format is version 1",
         dataset(patch_bytes(IDX, struct.pack("<Q", 2)))),
    Case("idx-dtype-code", train({"data.train": "[{tmp}/d]"}), "dataset", r"d\.idx: unknown dtype code 9 \(known: 1 uint8",
         dataset(patch_bytes(IDX + 8, bytes([9])))),
    Case("idx-truncated", train({"data.train": "[{tmp}/d]"}), "dataset",
         r"d\.idx: \d+ bytes, but its header \(120 sequences, 120 documents\) needs \d+: truncated", dataset(truncate("idx", 8))),
    Case("idx-shorter-than-header", train({"data.train": "[{tmp}/d]"}), "dataset",
         r"d\.idx: truncated: 12 bytes, shorter than the 34-byte header", dataset(lambda b, i: os.truncate(i, 12))),
    Case("bin-truncated", train({"data.train": "[{tmp}/d]"}), "dataset",
         r"d\.bin: \d+ bytes, but .*d\.idx counts \d+ tokens of uint16 = \d+ bytes: truncated", dataset(truncate("bin", 2))),
    Case("bin-extra-bytes", train({"data.train": "[{tmp}/d]"}), "dataset", r"d\.bin: .*: extra bytes", dataset(append_to_bin)),
    Case("bin-missing", train({"data.train": "[{tmp}/d]"}), "config", r"data\.train\[0\]\.path: .*d\.bin not found",
         dataset(lambda b, i: b.unlink())),
    Case("inspect-bad-magic", ["data", "inspect", "{tmp}/d"], "dataset", r"d\.idx: not a megatron \.idx file",
         dataset(patch_bytes(0, b"XXXXXXXXX"))),
    Case("inspect-bin-truncated", ["data", "inspect", "{tmp}/d"], "dataset", r"d\.bin: .*: truncated", dataset(truncate("bin", 2))),
    Case("inspect-missing", ["data", "inspect", "{tmp}/nothing"], "dataset", r"nothing\.bin: file not found"),
    Case("merge-truncated-input", ["data", "merge", "--input", "{data}", "{tmp}/d", "--output-prefix", "{tmp}/m"], "dataset",
         r"d\.idx: \d+ bytes, but its header .* truncated", dataset(truncate("idx", 1)), after=nothing_in("d.bin", "d.idx")),
    Case("eval-data-truncated", ["eval", "{ckpt}", "--seq-length", "16", "--data", "{tmp}/d"], "dataset",
         r"--data: .*d\.bin: .*truncated", dataset(truncate("bin", 4))),
    # ---- corpora ------------------------------------------------------------------------------------
    Case("preprocess-lone-surrogate", preprocess(), "corpus",
         r"c\.jsonl: line 2: 'text' holds a lone surrogate \\ud800 at character 7 \(valid JSON, not Unicode text\)",
         write("c.jsonl", small_corpus(SURROGATE)), after=nothing_in("c.jsonl")),
    Case("preprocess-lone-surrogate-skipped", preprocess("--on-bad-input", "skip"), None,
         setup=write("c.jsonl", small_corpus(SURROGATE)), after=skipped_and_counted),
    Case("tokenizer-lone-surrogate", tokenizer_train(), "corpus", r"c\.jsonl: line 2: 'text' holds a lone surrogate \\ud800",
         write("c.jsonl", small_corpus(SURROGATE)), after=nothing_in("c.jsonl")),
    Case("tokenizer-lone-surrogate-skipped", tokenizer_train("--on-bad-input", "skip"), None,
         setup=write("c.jsonl", small_corpus(SURROGATE, n=200)),
         after=lambda env: (env.tmp / "tok" / "spm.model").is_file()),
    Case("preprocess-empty-file", preprocess(), "corpus", r"c\.jsonl: empty: the file holds no documents",
         write("c.jsonl", b""), after=empty_twice),
    Case("preprocess-blank-lines", preprocess(), "corpus", r"c\.jsonl: empty: the file holds no documents",
         write("c.jsonl", "\n\n  \n"), after=nothing_in("c.jsonl")),
    Case("preprocess-empty-zst", preprocess(input="{tmp}/c.jsonl.zst"), "corpus", r"c\.jsonl\.zst: empty: the file holds no documents",
         lambda env: write_jsonl_zst(env.tmp / "c.jsonl.zst", [], "x"),
         after=nothing_in("c.jsonl.zst")),
    Case("preprocess-input-directory", preprocess(input="{tmp}"), "corpus", r": is a directory; give its files or a glob"),
    Case("preprocess-not-utf8", preprocess(), "corpus", r"c\.jsonl: line 1: not valid UTF-8", write("c.jsonl", b"\xff\xfe{}\n")),
    Case("preprocess-no-text-key", preprocess(), "corpus", r"c\.jsonl: line 1: no 'text' key",
         write("c.jsonl", '{"body": "x"}\n')),
    Case("tokenizer-empty-file", tokenizer_train(), "corpus", r"no non-empty documents under 'text'", write("c.jsonl", b"")),
    # ---- output paths -------------------------------------------------------------------------------
    Case("save-dir-under-a-file", train({"train.save_dir": "{tmp}/file/run"}), "output",
         r"train\.save_dir: .*file/run is under .*file, which is a file", write("file", "x"), after=nothing_in("file")),
    Case("save-dir-is-a-file", train({"train.save_dir": "{tmp}/file"}), "output", r"train\.save_dir: .*file is a file, not a directory",
         write("file", "x")),
    Case("save-dir-not-writable", train({"train.save_dir": "/sys/megalong-test/run"}), "output",
         r"train\.save_dir: cannot write in /sys/megalong-test/run \(its nearest existing folder /sys\): Permission denied"),
    Case("tensorboard-dir-under-a-file", train({"train.tensorboard_dir": "{tmp}/file/tb"}), "output",
         r"train\.tensorboard_dir: .* which is a file", write("file", "x")),
    Case("preprocess-output-under-a-file", preprocess(output="{tmp}/file/out"), "output",
         r"--output-prefix\): .*file/out is under .*file, which is a file",
         both(write("c.jsonl", small_corpus()), write("file", "x")), after=nothing_in("c.jsonl", "file")),
    Case("preprocess-output-is-a-directory", preprocess(output="{tmp}/outdir/"), "output",
         r"--output-prefix\): .*outdir/ is a directory, not a file prefix", write("c.jsonl", small_corpus())),
    Case("preprocess-disk-full", preprocess(), "output", r"out\.tmp/out\.bin: cannot write: No space left on device",
         write("c.jsonl", small_corpus()), after=nothing_in("c.jsonl"), patch=no_space),
    Case("tokenizer-prefix-under-a-file", tokenizer_train(prefix="{tmp}/file/spm"), "output",
         r"--model-prefix\): .*file/spm is under .*file, which is a file", both(write("c.jsonl", small_corpus()), write("file", "x"))),
    Case("tokenizer-settings-disk-full", tokenizer_train("--vocab-size", "512", input="{corpus}"), "output",
         r"spm\.settings\.json: cannot write: No space left on device", symlink_to_dev_full("tok/spm.settings.json")),
    Case("metrics-disk-full", train({"train.save_dir": "{tmp}/run"}), "output",
         r"run/metrics\.jsonl: cannot write: No space left on device", symlink_to_dev_full("run/metrics.jsonl")),
    Case("merge-output-under-a-file", ["data", "merge", "--input", "{data}", "--output-prefix", "{tmp}/file/m"], "output",
         r"--output-prefix: .*file/m is under .*file, which is a file", write("file", "x"), after=nothing_in("file")),
    Case("export-out-under-a-file", ["export", "{ckpt}", "{tmp}/file/hf"], "output",
         r"out_dir: .*file/hf is under .*file, which is a file", write("file", "x"), after=nothing_in("file")),
    Case("demo-workdir-under-a-file", ["demo", "--workdir", "{tmp}/file/demo", "--steps", "1"], "output",
         r"--workdir: .*file/demo is under .*file, which is a file", write("file", "x"), after=nothing_in("file")),
    # ---- training that goes non-finite --------------------------------------------------------------
    Case("loss-becomes-nan", train({"train.train_steps": 6, "train.lr": 1e8, "train.min_lr": 0, "train.weight_decay": 0,
                                    "train.warmup_steps": 0, "train.save_interval": 1}), "train",
         r"train\.nonfinite: step 2 has a non-finite loss nan, gradient norm nan; stopping \(the newest checkpoint, "
         r".*run/step_00000001, is from before it\)",
         after=lambda env: [p.name for p in (env.tmp / "run").glob("step_*")] == ["step_00000001"]),
    # ---- command-line numbers and usage -------------------------------------------------------------
    Case("eval-batch-size-zero", ["eval", "{ckpt}", "--seq-length", "16", "--batch-size", "0"], "usage",
         r"megalong eval: argument --batch-size: must be an integer >= 1, got '0'"),
    Case("eval-seq-length-one", ["eval", "{ckpt}", "--seq-length", "1"], "usage", r"argument --seq-length: must be an integer >= 2"),
    Case("eval-tokens-negative", ["eval", "{ckpt}", "--seq-length", "8", "--tokens", "-5"], "usage", r"argument --tokens: must be an integer >= 1"),
    Case("generate-temperature-negative", ["generate", "{ckpt}", "--prompt", "x", "--temperature", "-1"], "usage",
         r"argument --temperature: must be a finite number >= 0, got '-1'"),
    Case("generate-temperature-nan", ["generate", "{ckpt}", "--prompt", "x", "--temperature", "nan"], "usage",
         r"argument --temperature: must be a finite number >= 0, got 'nan'"),
    Case("generate-top-k-negative", ["generate", "{ckpt}", "--prompt", "x", "--top-k", "-1"], "usage", r"argument --top-k: must be an integer >= 0"),
    Case("generate-max-new-tokens-negative", ["generate", "{ckpt}", "--prompt", "x", "--max-new-tokens", "-1"], "usage",
         r"argument --max-new-tokens: must be an integer >= 0"),
    Case("preprocess-workers-zero", preprocess("--workers", "0"), "usage", r"megalong preprocess: argument --workers: must be an integer >= 1, got '0'"),
    Case("preprocess-max-doc-chars", preprocess("--max-doc-chars", "10"), "usage", r"argument --max-doc-chars: must be an integer >= 1000"),
    Case("preprocess-log-interval-zero", preprocess("--log-interval", "0"), "usage", r"argument --log-interval: must be a finite number > 0"),
    Case("preprocess-workers-not-a-number", preprocess("--workers", "two"), "usage", r"argument --workers: must be an integer >= 1, got 'two'"),
    Case("tokenizer-vocab-size-small", tokenizer_train("--vocab-size", "10"), "usage",
         r"megalong tokenizer train: argument --vocab-size: must be an integer >= 260, got '10'"),
    Case("tokenizer-sample-docs-zero", tokenizer_train("--sample-docs", "0"), "usage", r"argument --sample-docs: must be an integer >= 1"),
    Case("inspect-samples-negative", ["data", "inspect", "{data}", "--samples", "-1"], "usage", r"argument --samples: must be an integer >= 0"),
    Case("inspect-sample-tokens-zero", ["data", "inspect", "{data}", "--sample-tokens", "0"], "usage",
         r"argument --sample-tokens: must be an integer >= 1"),
    Case("demo-steps-zero", ["demo", "--steps", "0"], "usage", r"megalong demo: argument --steps: must be an integer >= 1, got '0'"),
    Case("train-world-size-zero", ["train", "--world-size", "0"], "usage", r"argument --world-size: must be an integer >= 1"),
    Case("unknown-command", ["trian"], "usage", r"megalong: argument command: invalid choice: 'trian'"),
    Case("missing-required", ["preprocess", "--input", "x"], "usage",
         r"the following arguments are required: --output-prefix, --tokenizer-model"),
    Case("set-before-command", ["--set", "train.lr=1", "train"], "usage", r"megalong: argument command: invalid choice: 'train\.lr=1'"),
    Case("set-without-value", ["train", "--set"], "usage", r"argument --set: expected one argument"),
    Case("unknown-option-after-config", ["train", "x.yaml", "--lr", "3"], "usage", r"unrecognized arguments: --lr 3"),
    # ---- launchers --------------------------------------------------------------------------------
    Case("torchrun-nproc-zero", ["--nproc", "0", "--dry-run", "configs/tiny-cpu.yaml"], "launch",
         r"launch/torchrun\.sh: --nproc must be a positive integer, got '0'", via="torchrun.sh"),
    Case("torchrun-config-error", lambda env: [*tiny_overrides(env.data, env.tmp / "run", 2, **{"train.adam_beta1": 1.5})],
         "config", r"train\.adam_beta1: must be in \[0, 1\), got 1\.5", via="torchrun.sh",
         after=lambda env: not (env.tmp / "run").exists()),
    Case("torchrun-layout-error", lambda env: ["--nproc", "3", "--dry-run", *tiny_overrides(env.data, env.tmp / "run", 2)],
         "config", r"train\.global_batch_size: 4 is not a multiple of train\.micro_batch_size x data-parallel size = 2 x 3",
         via="torchrun.sh"),
    Case("torchrun-missing-tokenizer", lambda env: ["--dry-run", *tiny_overrides(env.data, env.tmp / "run", 2,
                                                                                 **{"data.tokenizer": str(env.tmp / "no.model")})],
         "config", r"data\.tokenizer: file not found: .*no\.model", via="torchrun.sh"),
    Case("torchrun-into-another-runs-checkpoint", lambda env: ["--dry-run", *tiny_overrides(env.data, env.tmp / "run", 2)],
         "checkpoint", r"run: already holds 1 checkpoint\(s\) of another run", previous_run, via="torchrun.sh",
         after=previous_run_intact),
    Case("slurm-nproc-zero", ["--nproc", "0", "configs/tiny-cpu.yaml"], "launch",
         r"launch/slurm\.sbatch: --nproc must be a positive integer, got '0'", via="slurm.sbatch"),
    Case("slurm-config-error", lambda env: ["--dry-run", *tiny_overrides(env.data, env.tmp / "ignored", 2, **{"train.adam_eps": -1})],
         "config", r"train\.adam_eps: must be > 0, got -1", via="slurm.sbatch",
         launch_env={"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "FAKE_SLURM_HOSTS": "127.0.0.1",
                     "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "GPUS_PER_NODE": "1", "RUN_DIR": "{tmp}/slurm"}),
    Case("deepspeed-skip-zero3", lambda env: ["--num-gpus", "1", "--zero-stage", "3", "--dry-run",
                                              *tiny_overrides(env.data, env.tmp / "run", 2, **{"train.nonfinite": "skip"})],
         "config", r"train\.nonfinite: skip is not supported with deepspeed\.zero_stage 3", via="deepspeed.sh"),
]


@pytest.fixture(autouse=True)
def _restore_logging():
    """`megalong.cli.main` points the log at this test's captured stdout; put it back after."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A two-step tiny run's checkpoint, for the cases that read one."""
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train as run_training

    args = tiny_overrides(tiny_data, tmp_path_factory.mktemp("bad_inputs_ckpt"), 2)
    try:
        result = run_training(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    return result.checkpoint


def _run_launcher(script: str, argv: list[str], extra_env: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), **extra_env}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env=env)
    return {"argv": [script, *argv], "rc": proc.returncode, "stderr": proc.stderr}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_data, tmp_path, monkeypatch, request):
    env = Env(tmp_path / "case", tiny_data, str(Path(tiny_data.tokenizer).parent / "docs.jsonl.zst"))
    env.tmp.mkdir()
    argv = case.argv(env) if callable(case.argv) else list(case.argv)
    if "{ckpt}" in " ".join(argv) or "ckpt" in case.id or "checkpoint" in case.id:
        env.ckpt = request.getfixturevalue("trained_checkpoint")
    if case.setup is not None:
        case.setup(env)
    argv = [env.fill(a) for a in argv]
    if case.via == "cli":
        if case.patch is not None:
            case.patch(monkeypatch, env)
        result = run_case(argv)
    else:
        result = _run_launcher(case.via, argv, {k: env.fill(v) for k, v in case.launch_env.items()})
    if case.kind is None:
        assert result["rc"] == 0 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    else:
        line = error_line(result)
        prefix = f"megalong: {case.kind} error: "
        assert line.startswith(prefix), line
        assert re.search(case.message, line[len(prefix):]), line
        print(line)  # shown by pytest -rA
    if case.after is not None:
        result = case.after(env)
        assert result is None or result, f"{case.id}: the after-check failed"


def test_the_table_covers_every_kind():
    kinds = {c.kind for c in CASES}
    assert {"config", "tokenizer", "dataset", "corpus", "output", "train", "usage", "launch", "checkpoint",
            None} <= kinds
    assert len({c.id for c in CASES}) == len(CASES)
