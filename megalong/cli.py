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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors (a missing, unknown or out-of-range argument) on one line:
    `megalong: usage error: megalong eval: argument --batch-size: must be an integer >= 1, got '0'`."""

    def error(self, message: str):
        from megalong.errors import format_error

        self.exit(2, format_error("usage", f"{self.prog}: {message} (see {self.prog} --help)") + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    from megalong.preflight import check_run

    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cfg = check_run(args.configs, args.set or [], world_size)
    if args.check_config:
        print(f"config ok: {world_size} processes")
        return 0
    setup_logging(Path(cfg.train.save_dir) / "train.log" if cfg.train.save_dir else None)
    from megalong.parallel.distributed import shutdown
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
    from megalong.argtypes import positive_int

    parser = ArgumentParser(prog="megalong", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from one or more YAML configs (merged in order)")
    p.add_argument("configs", nargs="*", help="YAML files; later ones override earlier ones")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config, its data, tokenizer and output paths, then stop")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="processes to validate the layout for (default: $WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train, interleaved_configs=True)

    p = sub.add_parser("demo", help="the embedded default: corpus -> tokenizer -> data -> train -> "
                                    "export -> sample, on this machine, no network")
    p.add_argument("--workdir", default="megalong-demo", help="where everything is written")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the config's)")
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

    from megalong.checkpoint.convert import add_checkpoint_args

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


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """`megalong train a.yaml --set k=v b.yaml`: config files may come after --set options."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "interleaved_configs", False) and not any(a.startswith("-") for a in extra):
        args.configs = list(args.configs) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_megatron_warnings()
    from megalong.errors import MegalongError, describe_os_error, format_error

    args = parse_args(build_parser(), argv)
    if getattr(args, "logging", False):
        setup_logging()
    try:
        return args.func(args)
    except MegalongError as e:
        print(format_error(e.kind, e), file=sys.stderr)
        return 2
    except OSError as e:  # disk full, quota, read-only or permission: no traceback, the file named
        message = describe_os_error(e)
        if message is None:
            raise
        print(format_error("output", message), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
