"""Activation memory vs speed, in one run: plain, megatron-core full recompute, reversible, and
reversible + chunked feed-forward, for the 125M and 1.3B GPT-Neo shapes at L = 2k and 8k; then the
longest sequence each fits at batch 1 with local attention.

    python bench/memory.py                       # on the lent GPU (bf16 autocast, fused AdamW)
    python bench/memory.py --device cpu --small  # smoke test of the script on a tiny shape

Per (shape, L, variant): peak allocated memory of a training step (torch.cuda.max_memory_allocated,
after a warm-up step), median ms per step and tokens/s, or "OOM". Every layer is local attention
(window 256 on the GPU) so that 8k fits the plain model; `--attention global` keeps the
config's pattern. Prints one Markdown table per section, ready for bench/RESULTS.md.
On the CPU peak memory is not measured (no allocator statistics): only that every variant runs.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")

VARIANTS = {
    "plain": [],
    "full recompute": ["execution.recompute_granularity=full", "execution.recompute_method=uniform",
                       "execution.recompute_num_layers=1"],
    "reversible": ["model.reversible=true"],
    "reversible + chunked FFN": ["model.reversible=true", "execution.ffn_chunks=8"],
}


def make_cfg(config: str, seq: int, variant: list[str], attention: str, window: int, small: bool):
    from megalong.config import config_from_dict, load_raw, validate, deep_merge, parse_override

    raw = load_raw([config])
    layers = raw["model"]["num_layers"]
    sets = [f"model.max_position_embeddings={seq}", f"data.seq_length={seq}", "model.position_embedding=rope",
            "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
            f"execution.precision={'fp32' if small else 'bf16'}", *variant]
    if small:
        sets += ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
                 "model.vocab_size=512"]
        layers = 4
    if attention == "local":
        sets += [f'model.attention_layers=[[["local"], {layers}]]', f"model.attention={{local: {{window: {window}}}}}"]
    for item in sets:
        raw = deep_merge(raw, parse_override(item))
    cfg = config_from_dict(raw)
    validate(cfg, check_paths=False)
    return cfg


def step_fn(cfg, device: torch.device, batch: int, seq: int):
    from megalong.model.gpt import build_model
    from megalong.train.loop import train_step
    from megalong.train.optim import build_optimizer

    vocab = cfg.model.vocab_size or 50257
    torch.manual_seed(0)
    model = build_model(cfg, vocab).to(device).train()
    optimizer = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    data = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq, device=device)}
    return model, lambda: train_step(model, optimizer, [data], 1, cfg.train.lr, cfg, device)


def measure(cfg, device: torch.device, batch: int, seq: int, iters: int) -> tuple[float, float]:
    """(peak GiB or nan, median ms per step); raises torch.OutOfMemoryError."""
    cuda = device.type == "cuda"
    model, step = step_fn(cfg, device, batch, seq)
    try:
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return peak, sorted(times)[len(times) // 2]
    finally:
        del model, step
        if cuda:
            torch.cuda.empty_cache()


def longest(config: str, variant: list[str], device: torch.device, window: int, small: bool,
            start: int, limit: int) -> int:
    """Largest power-of-two sequence length (from `start`, up to `limit`) whose step fits at batch 1."""
    best, seq = 0, start
    while seq <= limit:
        try:
            measure(make_cfg(config, seq, variant, "local", window, small), device, 1, seq, 1)
            best = seq
        except torch.OutOfMemoryError:
            break
        seq *= 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--attention", choices=["local", "global"], default="local")
    parser.add_argument("--configs", nargs="+", default=["configs/gpt-neo-125m.yaml", "configs/gpt-neo-1.3b.yaml"])
    args = parser.parse_args()

    from megalong.parallel.distributed import initialize

    initialize(1)
    device = torch.device(args.device)
    seqs = [64, 128] if args.small else [2048, 8192]
    window = 16 if args.small else 256
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, batch {args.batch}, "
          f"{args.attention} attention{f' (window {window})' if args.attention == 'local' else ''}")
    print("| shape | L | variant | peak GiB | ms/step | tokens/s | vs plain |\n|---|---|---|---|---|---|---|")
    for config in args.configs:
        for seq in seqs:
            plain_ms = None
            for name, variant in VARIANTS.items():
                try:
                    cfg = make_cfg(config, seq, variant, args.attention, window, args.small)
                    peak, ms = measure(cfg, device, args.batch, seq, args.iters)
                    plain_ms = ms if name == "plain" else plain_ms
                    ratio = f"{ms / plain_ms:.2f}x" if plain_ms else "—"
                    print(f"| {config} | {seq} | {name} | {peak:.2f} | {ms:.1f} | "
                          f"{args.batch * seq / ms * 1e3:,.0f} | {ratio} |", flush=True)
                except torch.OutOfMemoryError:
                    print(f"| {config} | {seq} | {name} | OOM | — | — | — |", flush=True)
    print("\nLongest sequence at batch 1, local attention:\n| shape | variant | longest L |\n|---|---|---|")
    start, limit = (64, 256) if args.small else (8192, 1 << 20)
    for config in args.configs:
        for name, variant in VARIANTS.items():
            best = longest(config, variant, device, window, args.small, start, limit)
            print(f"| {config} | {name} | {best if best else 'below ' + str(start)} |", flush=True)


if __name__ == "__main__":
    main()
