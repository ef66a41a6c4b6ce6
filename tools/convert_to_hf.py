#!/usr/bin/env python
"""Export a megalong checkpoint to a Hugging Face folder (same as `megalong export`)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megalong.cli import setup_logging  # noqa: E402
from megalong.cli.commands_model import add_export_args, run_export  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_export_args(parser)
    setup_logging()
    sys.exit(run_export(parser.parse_args()))
