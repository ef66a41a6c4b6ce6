"""Does a reversible model learn like the plain one? The same small GPT (configs/tiny-cpu.yaml)
plain and reversible (mean merge; and reversible + chunked FFN), same seed, data and steps, on the
embedded corpus; held-out loss at the end.

    python bench/reversible_learning.py [--workdir megalong-bench-rev] [--steps 150] [--seeds 1234 ...]

CPU is enough. Record the printed table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

VARIANTS = {
    "plain": [],
    "reversible (mean merge)": ["model.reversible=true"],
    "reversible (split merge)": ["model.reversible=true", "model.reversible_merge=split"],
    "reversible + ffn_chunks 4": ["model.reversible=true", "execution.ffn_chunks=4"],
}


def main() -> None:
    from megalong.cli import quiet_bench_logging

    quiet_bench_logging()
    from megalong.config import load_config
    from megalong.demo import DEFAULT_CONFIG, demo_data
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="megalong-bench-rev")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--only", nargs="+", default=None, help="variants starting with these prefixes")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    _, tokenizer_prefix, data_prefix = demo_data(workdir)
    tokenizer, prefix = f"{tokenizer_prefix}.model", str(data_prefix)
    rows = []
    for name, extra in VARIANTS.items():
        if args.only is not None and not any(name.startswith(o) for o in args.only):
            continue
        losses = []
        for seed in args.seeds:
            slug = "".join(c if c.isalnum() else "_" for c in name)
            save = workdir / "runs" / f"{slug}_seed{seed}"
            overrides = [f"data.tokenizer={tokenizer}", f"data.train=[{prefix}]", f"train.save_dir={save}",
                         f"train.train_steps={args.steps}", "train.eval_interval=100000",
                         "train.log_interval=10", "train.progress_bar=false", f"train.seed={seed}", *extra]
            cfg = load_config([DEFAULT_CONFIG], overrides)
            try:
                result = train(cfg)
            finally:
                shutdown()
            losses.append(result.final_valid_loss)
            print(f"{name}, seed {seed}: held-out loss {result.final_valid_loss:.4f}", flush=True)
        rows.append((name, losses))
    tokens = args.steps * cfg.train.global_batch_size * cfg.seq_length
    print(f"\n{args.steps} steps, {tokens:,} tokens per run, configs/tiny-cpu.yaml; seeds {args.seeds}")
    print("| variant | held-out loss per seed | mean |\n|---|---|---|")
    for name, losses in rows:
        print(f"| {name} | {', '.join(f'{x:.4f}' for x in losses)} | {sum(losses) / len(losses):.4f} |")


if __name__ == "__main__":
    main()
