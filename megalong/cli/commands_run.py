"""`megalong train`, `megalong demo` and `megalong plot`: their arguments, and the runs (imported
when they run)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from megalong.argtypes import positive_int
from megalong.cli.logs import setup_logging


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from one or more YAML configs (merged in order)")
    p.add_argument("configs", nargs="*", help="YAML files; later ones override earlier ones")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config, its data, tokenizer and output paths, then stop")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="processes to validate the layout for (default: $WORLD_SIZE or 1)")
    p.set_defaults(func=run_train, interleaved_configs=True)


def run_train(args: argparse.Namespace) -> int:
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


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded default: corpus -> tokenizer -> data -> train -> "
                                    "export -> sample, on this machine, no network")
    p.add_argument("--workdir", default="megalong-demo", help="where everything is written")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the config's)")
    p.add_argument("--config", default=None, help="model/training config (default configs/tiny-cpu.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    setup_logging()
    from megalong.demo import run_demo as demo

    demo(Path(args.workdir), steps=args.steps, config=args.config, overrides=args.set or [])
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot runs' metrics.jsonl (loss, lr, tokens/s, MFU, grad norm, MoE "
                                    "load, perplexity by length) side by side into one image")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's train.save_dir (its metrics.jsonl)")
    p.add_argument("-o", "--output", required=True, help="the image to write (.png, .svg, .pdf)")
    p.add_argument("--dpi", type=positive_int, default=80)
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from megalong.plots.figure import plot_runs

    panels = plot_runs(args.run_dirs, args.output, args.dpi)
    print(f"wrote {args.output}: {', '.join(panels)}")
    return 0
