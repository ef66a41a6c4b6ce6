#!/usr/bin/env python
"""Tokenize .jsonl/.jsonl.zst into megatron .bin/.idx (same as `megalong preprocess`)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megalong.cli import setup_logging  # noqa: E402
from megalong.data.preprocess import add_preprocess_args, run_preprocess  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_preprocess_args(parser)
    setup_logging()
    sys.exit(run_preprocess(parser.parse_args()))
