"""The `megalong` argument parser: every command's arguments, none of their libraries."""
from __future__ import annotations

import argparse

from megalong.cli.commands_data import add_data, add_preprocess, add_tokenizer
from megalong.cli.commands_model import add_checkpoint, add_eval, add_export, add_generate, add_import
from megalong.cli.commands_run import add_demo, add_train

DESCRIPTION = "`megalong` command line: train | demo | preprocess | tokenizer train | import | export | generate | eval."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors (a missing, unknown or out-of-range argument) on one line:
    `megalong: usage error: megalong eval: argument --batch-size: must be an integer >= 1, got '0'`."""

    def error(self, message: str):
        from megalong.errors import format_error

        self.exit(2, format_error("usage", f"{self.prog}: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megalong", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_demo, add_preprocess, add_tokenizer, add_data, add_checkpoint, add_import, add_export,
                add_generate, add_eval):
        add(sub)
    return parser
