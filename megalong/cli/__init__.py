"""`megalong` command line: train | demo | preprocess | tokenizer train | import | export | generate | eval | plot.

Building the parser imports only argparse and megalong's light modules (megalong/cli/commands_*.py
hold every command's arguments); a command imports what it needs (torch, megatron-core,
transformers, DeepSpeed) when it runs, so `megalong --help` and the data commands start at once
(tests/test_cli_imports.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megalong.cli.logs import quiet_bench_logging, quiet_megatron_warnings, setup_logging
from megalong.cli.parser import build_parser

__all__ = ["main", "build_parser", "parse_args", "quiet_bench_logging", "quiet_megatron_warnings", "setup_logging"]


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
