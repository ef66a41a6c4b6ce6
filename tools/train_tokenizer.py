#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a sample of a corpus (same as `megalong tokenizer train`)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megalong.cli import setup_logging  # noqa: E402
from megalong.cli.commands_data import add_tokenizer_args, run_tokenizer_train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_tokenizer_args(parser)
    args = parser.parse_args()
    setup_logging()
    try:
        return run_tokenizer_train(args)
    except (ValueError, FileNotFoundError) as e:  # CorpusError is a ValueError
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
