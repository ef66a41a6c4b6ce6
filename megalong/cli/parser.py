"""The `megalong` argument parser: every command's arguments, none of their libraries."""
from __future__ import annotations

import argparse

from megalong.cli import commands_data, commands_model, commands_run

DESCRIPTION = "`megalong` command line: train | demo | preprocess | tokenizer train | export | generate | eval."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors (a missing, unknown or out-of-range argument) on one line:
    `megalong: usage error: megalong eval: argument --batch-size: must be an integer >= 1, got '0'`."""

    def error(self, message: str):
        from megalong.errors import format_error

        self.exit(2, format_error("usage", f"{self.prog}: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megalong", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    commands_run.add_train(sub)
    commands_run.add_demo(sub)
    commands_data.add_preprocess(sub)
    commands_data.add_tokenizer(sub)
    commands_data.add_data(sub)
    commands_model.add_checkpoint(sub)
    commands_model.add_export(sub)
    commands_model.add_generate(sub)
    commands_model.add_eval(sub)
    return parser
