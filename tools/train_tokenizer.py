#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a sample of a corpus (same as `megalong tokenizer train`)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megalong.cli import setup_logging  # noqa: E402
from megalong.data.tokenizer import add_tokenizer_args, run_tokenizer_train  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_tokenizer_args(parser)
    setup_logging()
    sys.exit(run_tokenizer_train(parser.parse_args()))
