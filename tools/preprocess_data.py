#!/usr/bin/env python
"""Tokenize .jsonl/.jsonl.zst into megatron .bin/.idx (same as `megalong preprocess`)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megalong.cli import quiet_megatron_warnings, setup_logging  # noqa: E402
from megalong.cli.commands_data import add_preprocess_args, run_preprocess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_preprocess_args(parser)
    args = parser.parse_args()
    quiet_megatron_warnings()
    setup_logging()
    try:
        return run_preprocess(args)
    except (ValueError, FileNotFoundError) as e:  # CorpusError is a ValueError
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
