"""`megalong` command line: train | demo | preprocess | tokenizer train | export | generate | eval."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence


def setup_logging(log_file: Optional[Path] = None) -> None:
    """INFO on rank 0 (and into log_file), warnings only elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers,
                        force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index
    # megatron warns about every MLP class it does not know, megalong's MoELayer included.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: "Unknown MLP type" not in record.getMessage())


def cmd_train(args: argparse.Namespace) -> int:
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown, world_size_from_env

    cfg = load_config(args.configs, args.set or [], world_size=world_size_from_env())
    setup_logging(Path(cfg.train.save_dir) / "train.log" if cfg.train.save_dir else None)
    from megalong.train.loop import train

    try:
        train(cfg)
    finally:
        shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging()
    from megalong.demo import run_demo

    run_demo(Path(args.workdir), steps=args.steps, config=args.config, overrides=args.set or [])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalong", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from one or more YAML configs (merged in order)")
    p.add_argument("configs", nargs="*", help="YAML files; later ones override earlier ones")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the embedded default: corpus -> tokenizer -> data -> train -> "
                                    "export -> sample, on this machine, no network")
    p.add_argument("--workdir", default="megalong-demo", help="where everything is written")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--config", default=None, help="model/training config (default configs/tiny-cpu.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=cmd_demo)

    from megalong.data.preprocess import add_preprocess_args, run_preprocess

    p = sub.add_parser("preprocess", help="tokenize .jsonl/.jsonl.zst into megatron .bin/.idx")
    add_preprocess_args(p)
    p.set_defaults(func=lambda a: run_preprocess(a) or 0, logging=True)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    from megalong.data.tokenizer import add_tokenizer_args, run_tokenizer_train

    tp = tsub.add_parser("train", help="train a SentencePiece tokenizer on a sample of a corpus")
    add_tokenizer_args(tp)
    tp.set_defaults(func=lambda a: run_tokenizer_train(a) or 0, logging=True)

    from megalong.data.inspect import add_data_args

    p = sub.add_parser("data", help="inspect or merge .bin/.idx datasets")
    add_data_args(p.add_subparsers(dest="data_command", required=True))

    from megalong.train.convert import add_checkpoint_args

    p = sub.add_parser("checkpoint", help="checkpoint tools (convert the old .pt format)")
    add_checkpoint_args(p.add_subparsers(dest="checkpoint_command", required=True))

    from megalong.export.hf import add_export_args, run_export

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face folder")
    add_export_args(p)
    p.set_defaults(func=lambda a: run_export(a) or 0, logging=True)

    from megalong.generate import add_generate_args, run_generate

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    add_generate_args(p)
    p.set_defaults(func=lambda a: run_generate(a) or 0, logging=True)

    from megalong.evaluate import add_eval_args, run_eval

    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint at any sequence length")
    add_eval_args(p)
    p.set_defaults(func=lambda a: run_eval(a) or 0, logging=True)
    return parser


def quiet_megatron_warnings() -> None:
    """megatron-core warns on import that TransformerEngine/apex are absent and about its own
    deprecations; megalong knows, and a user's log should not start with a page of them."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_megatron_warnings()
    from megalong.config import ConfigError
    from megalong.data.corpus import CorpusError
    from megalong.export.hf import ExportError
    from megalong.train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    if getattr(args, "logging", False):
        setup_logging()
    try:
        return args.func(args)
    except (ConfigError, CorpusError, CheckpointError, ExportError) as e:
        kind = {ConfigError: "config", CorpusError: "corpus", CheckpointError: "checkpoint",
                ExportError: "export"}[type(e)]
        print(f"megalong: {kind} error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
