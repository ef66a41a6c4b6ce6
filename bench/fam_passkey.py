"""Passkey retrieval with TransformerFAM (Hwang et al. 2024): a digit marked by a KEY token is placed
further back than any block sliding-window attention (BSWA) layer stack can see; at the end an ASK
token must name it. `fam` (megalong's `run_fam_layer` + `FamAttention`, the code megatron's
FamTransformerLayer runs) against the same model without feedback memory (fam_length 0, BSWA).

    python bench/fam_passkey.py [--steps 600] [--length 64] [--block 8] [--memory 1] [--layers 2]

The passkey sits at least `length - 2 - max_position` tokens before the question, more than the
BSWA stack's receptive field of layers x (memory + 1) x block tokens. CPU, a few minutes. Record
the printed table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from megalong.attention.fam import FamAttention, run_fam_layer

DIGITS, FILLER = 10, 20  # tokens 0..9 are passkey digits, 10..29 filler
KEY, ASK = DIGITS + FILLER, DIGITS + FILLER + 1
VOCAB = ASK + 1


class FamLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, block: int, memory: int, fam_length: int):
        super().__init__()
        cfg = SimpleNamespace(num_attention_heads=heads, kv_channels=hidden // heads, hidden_size=hidden,
                              attention_dropout=0.0)
        tp = SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1))
        self.heads, self.head_dim = heads, hidden // heads
        self.core = FamAttention(cfg, 1, block_size=block, memory_segments=memory, fam_length=fam_length,
                                 pg_collection=tp)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.fam_init = nn.Parameter(0.02 * torch.randn(fam_length, hidden)) if fam_length else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, hidden]
        def qkv(h):
            s, b, _ = h.shape
            return self.qkv(self.norm1(h)).view(s, b, self.heads, 3, self.head_dim).unbind(3)

        return run_fam_layer(x, self.fam_init, self.core, qkv, lambda ctx, res: res + self.proj(ctx),
                             lambda h: h + self.mlp(self.norm2(h)))


class Model(nn.Module):
    def __init__(self, args: argparse.Namespace, fam_length: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, args.hidden), nn.Embedding(args.length, args.hidden)
        self.layers = nn.ModuleList(FamLayer(args.hidden, args.heads, args.block, args.memory, fam_length)
                                    for _ in range(args.layers))
        self.norm, self.head = nn.LayerNorm(args.hidden), nn.Linear(args.hidden, DIGITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits of the digit at the ASK position
        h = (self.tokens(x) + self.positions(torch.arange(x.shape[1]))).transpose(0, 1)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h[-1]))


def batch(n: int, args: argparse.Namespace, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(DIGITS, DIGITS + FILLER, (n, args.length), generator=g)
    digit = torch.randint(0, DIGITS, (n,), generator=g)
    where = torch.randint(0, args.max_position, (n,), generator=g)
    rows = torch.arange(n)
    x[rows, where], x[rows, where + 1], x[:, -1] = KEY, digit, ASK
    return x, digit


def run(fam_length: int, args: argparse.Namespace) -> tuple[float, float, float]:
    torch.manual_seed(args.seed)
    model = Model(args, fam_length)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch(args.batch, args, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.time() - start
    model.eval()
    with torch.no_grad():
        x, y = batch(1024, args, torch.Generator().manual_seed(10_000 + args.seed))
        logits = model(x)
    return (logits.argmax(-1) == y).double().mean().item(), F.cross_entropy(logits, y).item(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--memory", type=int, default=1)
    parser.add_argument("--fam-length", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position", type=int, default=None,
                        help="the KEY token lies in [0, max_position); default: just outside BSWA's reach")
    args = parser.parse_args()
    reach = args.layers * (args.memory + 1) * args.block
    if args.max_position is None:
        args.max_position = args.length - 2 - reach - 1
    if args.max_position < 1:
        raise SystemExit(f"--length {args.length} leaves no room beyond the BSWA reach of {reach} tokens")
    gap = args.length - 1 - (args.max_position - 1 + 1)
    print(f"passkey at least {gap} tokens before the question; BSWA receptive field {reach} tokens "
          f"({args.layers} layers x (memory {args.memory} + 1) x block {args.block}); chance {100 / DIGITS:.0f}%")
    print("| model | passkey accuracy | held-out loss | train seconds |")
    print("|---|---|---|---|")
    for name, fam_length in ((f"fam, fam_length={args.fam_length}", args.fam_length),
                             ("block sliding window, no FAM", 0)):
        accuracy, loss, seconds = run(fam_length, args)
        print(f"| {name} | {100 * accuracy:.1f}% | {loss:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
