"""Attention surgery with `train.init_from`: is a global model turned partly local or linear, then
trained on, better than the converted model trained from scratch for the same total steps?

1. source: global attention in every layer, --source-steps steps;
2. surgery: `train.init_from` the source with half its layers (the 2nd and 4th) turned `local`
   (window 32) and, separately, `linear`, each trained --continue-steps more steps (a fresh
   optimizer and schedule, as init_from gives);
3. scratch: the same two converted configs trained source + continue steps from random init.

Every model is configs/tiny-cpu.yaml's model (4 layers, 4 heads; --hidden to shrink it) with RoPE
positions (`linear` has no attention scores for ALiBi to bias, and learned positions cannot run past
the training length), trained at 128 tokens from the same seed on the main job's corpus (as
`megalong demo` prepares it). Held-out loss (`megalong eval`) on the same tokens at 128 and 512.

    python bench/attention_surgery.py --workdir /tmp/surgery-bench --source-steps 200 --continue-steps 100
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TRAIN_LENGTH = 128
EVAL_LENGTHS = [TRAIN_LENGTH, 4 * TRAIN_LENGTH]
KINDS = {
    "global": '[[["global"], 4]]',
    "local": '[[["global", "local"], 2]]',
    "linear": '[[["global", "linear"], 2]]',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="surgery-bench")
    parser.add_argument("--source-steps", type=int, default=200)
    parser.add_argument("--continue-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 128 tokens per step")
    parser.add_argument("--hidden", type=int, default=256, help="model.hidden_size (tiny-cpu: 256)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()

    from megalong.cli import quiet_bench_logging

    quiet_bench_logging()
    from megalong.config import load_config
    from megalong.demo import DEFAULT_CONFIG, demo_data
    from megalong.evaluate import evaluate_checkpoint
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    work = Path(args.workdir).resolve()
    _, tokenizer_prefix, data_prefix = demo_data(work)

    def run(name: str, kind: str, steps: int, init_from: Path | None) -> dict:
        started = time.perf_counter()
        overrides = [f"data.tokenizer={tokenizer_prefix}.model", f"data.train=[{data_prefix}]",
                     f"data.seq_length={TRAIN_LENGTH}", f"model.max_position_embeddings={TRAIN_LENGTH}",
                     f"model.hidden_size={args.hidden}", "model.position_embedding=rope",
                     f"model.attention_layers={KINDS[kind]}", "model.attention={local: {window: 32}}",
                     f"train.train_steps={steps}", f"train.save_dir={work / name}",
                     f"train.micro_batch_size={args.batch_size}", f"train.global_batch_size={args.batch_size}",
                     "train.load=null", "train.seed=1234", f"train.warmup_steps={max(1, steps // 10)}",
                     "train.progress_bar=false", f"train.eval_interval={steps}",
                     f"train.log_interval={max(1, steps // 4)}",
                     f"train.init_from={init_from if init_from else 'null'}"]
        try:
            result = train(load_config([DEFAULT_CONFIG], overrides))
        finally:
            shutdown()
        train_s = time.perf_counter() - started
        results = evaluate_checkpoint(result.checkpoint, EVAL_LENGTHS, max_tokens=args.eval_tokens)
        row = {"kind": kind, "steps": steps, "init_from": str(init_from) if init_from else None,
               "train_loss": result.losses[max(result.losses)], "train_s": round(train_s, 1),
               "checkpoint": str(result.checkpoint), **{str(r.seq_length): r.loss for r in results}}
        print(name, json.dumps(row), flush=True)
        return row

    total = args.source_steps + args.continue_steps
    rows = {"source (global)": run("source", "global", args.source_steps, None)}
    source = Path(rows["source (global)"]["checkpoint"])
    for kind in ("local", "linear"):
        rows[f"surgery -> {kind}"] = run(f"surgery-{kind}", kind, args.continue_steps, source)
        rows[f"scratch {kind}"] = run(f"scratch-{kind}", kind, total, None)
        (work / "results.json").write_text(json.dumps(rows, indent=1))

    print(f"\n| model | steps | train loss | loss @{EVAL_LENGTHS[0]} | loss @{EVAL_LENGTHS[1]} | train s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        steps = (f"{args.source_steps} + {row['steps']}" if row["init_from"] else str(row["steps"]))
        print(f"| {name} | {steps} | {row['train_loss']:.3f} | {row[str(EVAL_LENGTHS[0])]:.3f} | "
              f"{row[str(EVAL_LENGTHS[1])]:.3f} | {row['train_s']:.0f} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
