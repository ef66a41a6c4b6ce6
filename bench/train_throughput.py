"""Training throughput of the GPT-Neo 125M shape on one GPU: megalong beside its peers, same shape,
same batch, same optimizer, in one run. Rows:

  1. megalong (megatron-core GPTModel, megalong spec), eager
  2. megalong with execution.compile=true (megalong.model.compile.compile_layers: each layer compiled)
  3. Hugging Face GPTNeoForCausalLM, eager
  4. hand-written PyTorch GPT (bench/peer_gpt.py), SDPA in every layer, eager
  5. the same under torch.compile
  6. the same with FlexAttention sliding-window local layers (the config's local window, 256) at
     every other layer (global/local as in GPT-Neo), under torch.compile

    python bench/train_throughput.py [--config configs/gpt-neo-125m.yaml] [--batch 8] [--seq 2048]
    python bench/train_throughput.py --device cpu --small   # smoke test of every row on a tiny shape

On the GPU: bf16 autocast, fused AdamW, random tokens (throughput does not depend on the text).
Prints per row the median ms per step (the first --warmup steps, which compile, are not timed),
tokens/s, MFU and peak allocated memory. MFU is the same model FLOPs for every row,
megalong.model.gpt.model_flops_per_token of the config (local layers counted at their window),
over --peak-tflops, so the rows compare. Record the printed lines in bench/RESULTS.md with the
date and device.

--small shrinks the shape (4 layers, hidden 64, 4 heads, vocab 512, window 32, batch 2 x 128,
float32) and, with --device cpu, only checks that every row runs: CPU timings are not speeds, and
there is no peak memory. FlexAttention has no backward on the CPU, so row 6 fails there.
`--only SUBSTRING` runs only the rows whose name contains it. `--check-args` (no GPU needed) loads
the config with the same arguments, checks the rows' imports, prints the header and the rows that
would run, and exits (bench/gpu_check.sh --dry-run).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

# Benchmark the megalong of this checkout, whatever copy an editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=512",
         'model.attention_layers=[[["global", "local"], 2]]', "model.attention={local: {window: 32}}",
         "execution.precision=fp32"]


def timed(step, warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds per call of step(), synchronising the device around each call (CUDA)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def megalong_step(cfg, vocab: int, batch: int, seq: int, device: torch.device):
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize
    from megalong.train.loop import train_step
    from megalong.train.optim import build_optimizer

    initialize(1)
    torch.manual_seed(0)
    model = build_model(cfg, vocab).to(device).train()
    if cfg.execution.compile:
        from megalong.model.compile import compile_layers

        compile_layers(model)
    optimizer = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    data = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": torch.ones(batch, seq, device=device)}
    return lambda: train_step(model, optimizer, [data], 1, cfg.train.lr, cfg, device)


def hf_gpt_neo_step(cfg, vocab: int, batch: int, seq: int, device: torch.device):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    m = cfg.model
    cuda = device.type == "cuda"
    hf_cfg = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=m.max_position_embeddings,
                          hidden_size=m.hidden_size, num_layers=m.num_layers,
                          attention_types=[[["global", "local"], m.num_layers // 2]],
                          num_heads=m.num_attention_heads, window_size=cfg.attention_options("local").window,
                          intermediate_size=cfg.ffn_hidden_size, embed_dropout=0.0, attention_dropout=0.0,
                          resid_dropout=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(hf_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True if cuda else None)
    ids = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def peer_step(compile: bool, flex_local: bool):
    """Row factory for the hand-written GPT of bench/peer_gpt.py."""
    def make(cfg, vocab: int, batch: int, seq: int, device: torch.device):
        from peer_gpt import make_peer_step  # bench/ is sys.path[0] when this script runs

        return make_peer_step(cfg, vocab, batch, seq, device, compile=compile, flex_local=flex_local)
    return make


# (name, extra config overrides, step factory)
ROWS = [
    ("megalong (megatron-core GPTModel, megalong spec)", [], megalong_step),
    ("megalong, execution.compile=true (layers torch.compile'd)", ["execution.compile=true"], megalong_step),
    ("Hugging Face GPTNeoForCausalLM (eager)", [], hf_gpt_neo_step),
    ("PyTorch GPT, SDPA (eager)", [], peer_step(compile=False, flex_local=False)),
    ("PyTorch GPT, SDPA (torch.compile)", [], peer_step(compile=True, flex_local=False)),
    ("PyTorch GPT, global SDPA / local FlexAttention window (torch.compile)", [],
     peer_step(compile=True, flex_local=True)),
]


def check_rows(rows, make_cfg) -> None:
    """--check-args: every row's config loads and the modules its step needs import."""
    import peer_gpt  # noqa: F401  (bench/ is sys.path[0])
    import torch.nn.attention.flex_attention  # noqa: F401
    import transformers  # noqa: F401

    import megalong.model.compile  # noqa: F401
    import megalong.train.loop  # noqa: F401

    for name, extra, _ in rows:
        make_cfg(extra)
        print(f"  would run: {name}")
    print(f"bench/train_throughput.py: {len(rows)} rows")


def main() -> None:
    from megalong.config import load_config
    from megalong.model.gpt import model_flops_per_token

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt-neo-125m.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shape, float32 (smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --small)")
    parser.add_argument("--seq", type=int, default=None, help="default 2048 (128 with --small)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps; default 5 (1 with --small)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps; default 20 (2 with --small)")
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this")
    parser.add_argument("--check-args", action="store_true",
                        help="load the config, check the imports, print the rows that would run, exit")
    args = parser.parse_args()
    batch = args.batch or (2 if args.small else 8)
    seq = args.seq or (128 if args.small else 2048)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    iters = args.iters or (2 if args.small else 20)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available() and not args.check_args:
        raise SystemExit("bench/train_throughput.py: no CUDA GPU here (--device cpu --small checks the script)")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sets = [f"data.seq_length={seq}", f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}"]
    sets += SMALL if args.small else ["execution.precision=bf16"]

    def make_cfg(extra: list[str]):
        return load_config([args.config], sets + extra, check_paths=False)

    cfg = make_cfg([])
    vocab = cfg.model.vocab_size
    flops = model_flops_per_token(cfg, vocab)
    tokens = batch * seq
    m = cfg.model
    gpu_name = torch.cuda.get_device_name(device) if cuda and torch.cuda.is_available() else "no GPU"
    print(f"{gpu_name if cuda else 'cpu (timings are not speeds)'} | "
          f"torch {torch.__version__} | {args.config}{' --small' if args.small else ''} | layers {m.num_layers}, "
          f"hidden {m.hidden_size}, heads {m.num_attention_heads}, vocab {vocab}, "
          f"window {cfg.attention_options('local').window} | batch {batch} x {seq} | "
          f"{'bf16 autocast' if cfg.execution.precision == 'bf16' else cfg.execution.precision} (peers: "
          f"{'bf16 autocast' if cuda else 'fp32'}), {'fused ' if cuda else ''}AdamW | "
          f"{flops / 1e6:.1f} MFLOP/token", flush=True)
    rows = [row for row in ROWS if not args.only or args.only in row[0]]
    if args.check_args:
        check_rows(rows, make_cfg)
        return
    for name, extra, make in rows:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = make(make_cfg(extra), vocab, batch, seq, device)
            ms = timed(step, warmup, iters, device)
        except Exception as e:  # a row failing must not hide the other rows
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        finally:
            step = None  # free the model before the next row
        tok_s = tokens / (ms / 1e3)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else "n/a"
        print(f"{name}: {ms:.1f} ms/step, {tok_s:,.0f} tokens/s, "
              f"MFU {100 * tok_s * flops / (args.peak_tflops * 1e12):.1f}%, peak memory {peak}", flush=True)


if __name__ == "__main__":
    main()
