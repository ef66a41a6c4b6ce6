"""Does MoE learn and balance? A small MoE GPT against the dense GPT with the same active
parameters, on the embedded corpus, same steps and tokens; one row per router/balancing method.

    python bench/moe_learning.py [--workdir megalong-bench-moe] [--steps 150] [--seeds 1234 ...]
                                 [--only dense topk ...]

CPU is enough. Prints held-out loss after the same tokens and the per-expert load band (smallest
and largest share of assignments over the MoE layers, mean over the logged steps of the second
half of training). Record the printed table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# Dense MLP width 1024 (4 x 256); each MoE variant activates the same 1024 expert units per token.
VARIANTS = {
    "dense": [],
    "topk top-2, aux loss 0.01": ["model.moe={num_experts: 8, top_k: 2, expert_hidden_size: 512, aux_loss_coeff: 0.01}"],
    "topk top-2, aux-loss-free bias": ["model.moe={num_experts: 8, top_k: 2, expert_hidden_size: 512, aux_loss_coeff: 0.0, bias_update_rate: 0.001}"],
    "switch top-1, aux loss 0.01": ["model.moe={num_experts: 8, top_k: 1, router: switch, expert_hidden_size: 1024, aux_loss_coeff: 0.01}"],
    "noisy top-2 (Shazeer)": ["model.moe={num_experts: 8, top_k: 2, router: noisy_topk, expert_hidden_size: 512, aux_loss_coeff: 0.01}"],
}


def load_band(save_dir: Path, steps: int) -> tuple[float, float]:
    mins, maxs = [], []
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] > steps // 2:
            mins += [v for k, v in record.items() if k.endswith("/load_min")]
            maxs += [v for k, v in record.items() if k.endswith("/load_max")]
    return (sum(mins) / len(mins), sum(maxs) / len(maxs)) if mins else (float("nan"), float("nan"))


def main() -> None:
    from megalong.cli import quiet_bench_logging

    quiet_bench_logging()
    from megalong.config import load_config
    from megalong.demo import DEFAULT_CONFIG, demo_data
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="megalong-bench-moe")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234],
                        help="one run per seed (initial weights, data order and noise)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="variants whose name starts with one of these prefixes (default: all)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    _, tokenizer_prefix, data_prefix = demo_data(workdir)
    tokenizer, prefix = f"{tokenizer_prefix}.model", str(data_prefix)
    variants = {name: extra for name, extra in VARIANTS.items()
                if args.only is None or any(name.startswith(o) for o in args.only)}
    rows = []
    for name, extra in variants.items():
        losses, band = [], (float("nan"), float("nan"))
        for seed in args.seeds:
            run = name.split(",")[0].replace(" ", "_").replace("(", "").replace(")", "")
            save = workdir / "runs" / f"{run}_seed{seed}"
            overrides = [f"data.tokenizer={tokenizer}", f"data.train=[{prefix}]", f"train.save_dir={save}",
                         f"train.train_steps={args.steps}", "train.eval_interval=100000",
                         "train.log_interval=10", "train.progress_bar=false", f"train.seed={seed}",
                         "model.ffn_hidden_size=1024"]
            if extra:
                overrides += ['model.mlp_layers=[[["dense", "moe"], 2]]', *extra]
            cfg = load_config([DEFAULT_CONFIG], overrides)
            try:
                result = train(cfg)
            finally:
                shutdown()
            if extra and seed == args.seeds[0]:
                band = load_band(save, args.steps)
            losses.append(result.final_valid_loss)
            print(f"{name}, seed {seed}: held-out loss {result.final_valid_loss:.4f}", flush=True)
        rows.append((name, losses, *band))
    tokens = args.steps * cfg.train.global_batch_size * cfg.seq_length
    print(f"\n{args.steps} steps, {tokens:,} tokens per run, configs/tiny-cpu.yaml with ffn 1024; "
          f"8 experts in layers 2 and 4; seeds {args.seeds}")
    print("| variant | held-out loss per seed | mean | expert load share min / max (uniform 0.125) |")
    print("|---|---|---|---|")
    for name, losses, low, high in rows:
        band = "—" if low != low else f"{low:.3f} / {high:.3f}"
        per_seed = ", ".join(f"{x:.4f}" for x in losses)
        print(f"| {name} | {per_seed} | {sum(losses) / len(losses):.4f} | {band} |")


if __name__ == "__main__":
    main()
