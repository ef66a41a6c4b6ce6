"""Training throughput of the GPT-Neo 125M shape on one GPU: megalong beside Hugging Face's
GPTNeoForCausalLM (same shape, same batch, same optimizer) in one run.

    python bench/train_throughput.py [--config configs/gpt-neo-125m.yaml] [--batch 8] [--seq 2048]

bf16 autocast, fused AdamW, random tokens (throughput does not depend on the text). Prints ms per
step, tokens/s and MFU (model FLOPs from megalong.model.gpt.model_flops_per_token over
--peak-tflops). Record the printed lines in bench/RESULTS.md with the date and device.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def timed(step, warmup: int, iters: int) -> float:
    """Median milliseconds per call of step(), synchronising the device around each call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def megalong_step(cfg, vocab: int, batch: int, seq: int):
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize
    from megalong.train.loop import train_step
    from megalong.train.optim import build_optimizer

    layout = initialize(1)
    torch.manual_seed(0)
    model = build_model(cfg, vocab).to(layout.device).train()
    optimizer = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=layout.device)
    data = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": torch.ones(batch, seq, device=layout.device)}
    return lambda: train_step(model, optimizer, [data], 1, cfg.train.lr, cfg, layout.device)


def hf_gpt_neo_step(cfg, vocab: int, batch: int, seq: int):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    m = cfg.model
    hf_cfg = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=m.max_position_embeddings,
                          hidden_size=m.hidden_size, num_layers=m.num_layers,
                          attention_types=[[["global", "local"], m.num_layers // 2]],
                          num_heads=m.num_attention_heads, window_size=cfg.attention_options("local").window,
                          intermediate_size=cfg.ffn_hidden_size, embed_dropout=0.0, attention_dropout=0.0,
                          resid_dropout=0.0)
    model = GPTNeoForCausalLM(hf_cfg).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    from megalong.config import load_config
    from megalong.model.gpt import model_flops_per_token

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt-neo-125m.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default=None, help="run only the row whose name contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_throughput.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load_config([args.config], [f"data.seq_length={args.seq}", "train.precision=bf16",
                                      f"train.micro_batch_size={args.batch}",
                                      f"train.global_batch_size={args.batch}"], check_paths=False)
    vocab = cfg.model.vocab_size
    flops = model_flops_per_token(cfg, vocab)
    tokens = args.batch * args.seq
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.config} | "
          f"batch {args.batch} x {args.seq} | bf16 autocast, fused AdamW")
    for name, make in [("megalong (megatron-core GPTModel, megalong spec)", megalong_step),
                       ("Hugging Face GPTNeoForCausalLM (eager)", hf_gpt_neo_step)]:
        if args.only and args.only not in name:
            continue
        try:
            ms = timed(make(cfg, vocab, args.batch, args.seq), args.warmup, args.iters)
        except Exception as e:  # a peer failing must not hide the other rows
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        tok_s = tokens / (ms / 1e3)
        print(f"{name}: {ms:.1f} ms/step, {tok_s:,.0f} tokens/s, MFU {100 * tok_s * flops / (args.peak_tflops * 1e12):.1f}%, "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
