"""ALiBi length extrapolation, small (Press et al. 2022, Figure 1): train at 128 tokens, evaluate
perplexity at 128, 256, 512 and 1024 for ALiBi, learned absolute positions and RoPE.

Each model is configs/tiny-cpu.yaml with global attention in every layer, trained for the same
steps from the same seed on the main job's corpus (the standard library documentation, its BPE
tokenizer and .bin/.idx, as `megalong demo` makes them); only the position scheme differs. The
evaluation (`megalong eval`) scores the same held-out tokens at every length. Learned absolute
positions have no embedding past 128 and cannot be evaluated there.

    python bench/alibi_extrapolation.py --workdir /tmp/alibi-bench --steps 300
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "alibi": ["model.alibi=true", "model.position_embedding=none"],
    "learned": ["model.position_embedding=learned"],
    "rope": ["model.position_embedding=rope"],
}
TRAIN_LENGTH = 128
EVAL_LENGTHS = [128, 256, 512, 1024]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="alibi-bench")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences of 128 tokens per step")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
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
    rows = {}
    for name in args.variants:
        started = time.perf_counter()
        overrides = [f"data.tokenizer={tokenizer_prefix}.model", f"data.train=[{data_prefix}]",
                     f"data.seq_length={TRAIN_LENGTH}", f"model.max_position_embeddings={TRAIN_LENGTH}",
                     'model.attention_layers=[[["global"], 4]]', f"train.train_steps={args.steps}",
                     f"train.save_dir={work / name}",
                     f"train.micro_batch_size={args.batch_size}", f"train.global_batch_size={args.batch_size}", "train.load=null", "train.seed=1234", f"train.warmup_steps={max(1, args.steps // 10)}",
                     "train.progress_bar=false", f"train.eval_interval={args.steps}",
                     f"train.log_interval={max(1, args.steps // 4)}", *VARIANTS[name]]
        try:
            result = train(load_config([DEFAULT_CONFIG], overrides))
        finally:
            shutdown()
        train_s = time.perf_counter() - started
        lengths = [n for n in EVAL_LENGTHS if name != "learned" or n <= TRAIN_LENGTH]
        results = evaluate_checkpoint(result.checkpoint, lengths, max_tokens=args.eval_tokens)
        rows[name] = {"train_loss": result.losses[max(result.losses)], "train_s": train_s,
                      **{str(r.seq_length): r.perplexity for r in results}}
        print(name, json.dumps(rows[name]), flush=True)

    print("\n| position | train loss | " + " | ".join(f"ppl @{n}" for n in EVAL_LENGTHS) + " |")
    print("|---|---|" + "---|" * len(EVAL_LENGTHS))
    for name, row in rows.items():
        cells = [f"{row[str(n)]:.2f}" if str(n) in row else "cannot run" for n in EVAL_LENGTHS]
        print(f"| {name} | {row['train_loss']:.3f} | " + " | ".join(cells) + " |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
