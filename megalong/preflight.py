"""Checks of a training run's inputs and outputs before any model, data or process group is built,
beyond what `config.validate` can see in the config alone: the tokenizer parses, every dataset's
.bin/.idx pair is whole, every output directory can be written, `train.save_dir` holds no other
run's checkpoints that the run would replace (megalong/checkpoint/layout.py), and the dataset index
cache holds no pickle (megalong/data/index_cache.py).

`python -m megalong.preflight [--world-size N] CONFIG.yaml ... [--set KEY=VALUE ...]` runs the
config validation and these checks without importing torch or megatron-core, and prints the one
line `megalong: <kind> error: ...` of the first problem (exit status 2) or `config ok: ...`. The
launchers run it once before starting any process, so that a config error is one clear message
instead of one traceback per rank followed by torchrun's ChildFailedError.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional, Sequence

from megalong.config import Config, ConfigError, load_config
from megalong.errors import MegalongError, TokenizerError, format_error
from megalong.data.index_cache import check_index_cache, index_cache_root
from megalong.paths import check_writable_dir
from megalong.checkpoint.layout import replaced_checkpoints


def check_train_inputs(cfg: Config) -> None:
    """Raise the MegalongError (naming the config key) of the first input or output of `cfg`
    that would fail later: an unparsable tokenizer, a damaged dataset, an unwritable directory."""
    from megalong.data.indexed import check_dataset
    from megalong.data.tokenizer import SentencePieceTokenizer

    t, d = cfg.train, cfg.data
    # Outputs first: the cheapest to check, and the most expensive to find out about late.
    for key, path in (("train.save_dir", t.save_dir), ("train.tensorboard_dir", t.tensorboard_dir),
                      ("train.profile.dir", t.profile.dir if t.profile.start_step else None),
                      ("data.cache_dir", d.cache_dir)):
        if path:
            check_writable_dir(path, key)
    replaced_checkpoints(cfg)  # another run's checkpoints there: refused unless train.overwrite
    check_index_cache(index_cache_root(cfg), recursive=True)  # numpy would unpickle a stranger's
    if t.tensorboard_dir:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("train.tensorboard_dir: the tensorboard package is not installed "
                              "(pip install tensorboard)") from None
    if t.wandb.project and t.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb.project: the wandb package is not installed (pip install wandb, "
                          "or pip install -e '.[wandb]')")
    if d.tokenizer:
        try:
            tokenizer = SentencePieceTokenizer(d.tokenizer)
        except TokenizerError as e:
            raise TokenizerError(f"data.tokenizer: {e}") from None
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                              f"{tokenizer.vocab_size} pieces of data.tokenizer {d.tokenizer}")
    for i, entry in enumerate(d.train):
        check_dataset(entry.path, f"data.train[{i}].path")


def check_run(paths: Sequence[str], overrides: Sequence[str], world_size: int) -> Config:
    """Load and validate the config for `world_size` processes, then check its inputs and outputs."""
    if world_size < 1:
        raise ConfigError(f"world size: expected at least 1 process, got {world_size}")
    cfg = load_config(list(paths), list(overrides), world_size=world_size)
    check_train_inputs(cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalong.preflight",
                                     description="validate a training config before launching it")
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="processes of the run (nproc x nnodes)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = check_run(args.configs, args.set, args.world_size)
    except MegalongError as e:
        print(format_error(e.kind, e), file=sys.stderr)
        return 2
    p = cfg.parallel
    print(f"config ok: {args.world_size} processes (tensor {p.tensor} x pipeline {p.pipeline} x data "
          f"{args.world_size // (p.tensor * p.pipeline)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
