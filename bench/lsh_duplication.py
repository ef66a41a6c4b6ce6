"""Reformer's duplication task (Kitaev et al. 2020, section 5): sequences `0 w 0 w`, the second copy
predicted from the first, with one LSH attention layer (megalong's `LshAttention`, shared QK).
Accuracy on the second copy for a model trained and evaluated with n_hashes = 1, 2, 4, beside the
same model with full causal attention (as the paper's Table 2, small).

    python bench/lsh_duplication.py [--steps 400] [--length 64] [--bucket 8] [--hashes 1 2 4]

CPU, a few minutes. Record the printed table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from megalong.attention.global_attention import GlobalAttention
from megalong.attention.lsh import LshAttention


class OneLayer(nn.Module):
    """Embeddings + one pre-norm transformer layer (shared-QK attention, MLP) + output head."""

    def __init__(self, vocab: int, length: int, hidden: int, heads: int, core: nn.Module):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.tokens, self.positions = nn.Embedding(vocab, hidden), nn.Embedding(length, hidden)
        self.norm1, self.norm2, self.norm_out = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qv = nn.Linear(hidden, 2 * hidden, bias=False)  # shared QK: queries and values only
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.head = nn.Linear(hidden, vocab)
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, L] -> logits [batch, L, vocab]
        b, L = x.shape
        h = (self.tokens(x) + self.positions(torch.arange(L))).transpose(0, 1)  # [L, b, hidden]
        q, v = self.qv(self.norm1(h)).view(L, b, self.heads, 2, self.head_dim).unbind(3)
        k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # used by the global baseline only
        h = h + self.proj(self.core(q, k, v))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm_out(h)).transpose(0, 1)


def batch(n: int, length: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    half = length // 2
    w = torch.randint(1, vocab, (n, half - 1), generator=g)
    zero = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([zero, w, zero, w], dim=1)


def run(kind: str, n_hashes: int, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(args.seed)
    cfg = SimpleNamespace(num_attention_heads=args.heads, kv_channels=args.hidden // args.heads,
                          hidden_size=args.hidden, attention_dropout=0.0)
    tp = SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1))
    core = (LshAttention(cfg, 1, n_hashes=n_hashes, bucket_size=args.bucket, seed=args.seed, pg_collection=tp)
            if kind == "lsh" else GlobalAttention(cfg, 1, pg_collection=tp))
    model = OneLayer(args.vocab, args.length, args.hidden, args.heads, core)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    half = args.length // 2
    start = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch(args.batch, args.length, args.vocab, g)
        logits = model(x)
        # Only the second copy is predictable: positions half .. L-2 predict tokens half+1 .. L-1.
        loss = F.cross_entropy(logits[:, half:-1].flatten(0, 1), x[:, half + 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.time() - start
    model.eval()
    accuracy = {}
    x = batch(1024, args.length, args.vocab, torch.Generator().manual_seed(10_000 + args.seed))
    for n in (args.hashes if kind == "lsh" else [0]):  # evaluated with other hash counts too
        core.n_hashes = n if kind == "lsh" else 0
        with torch.no_grad():
            pred = model(x)[:, half:-1].argmax(-1)
        accuracy[n] = (pred == x[:, half + 1:]).double().mean().item()
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--bucket", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hashes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-full", action="store_true", help="skip the full-attention baseline")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [("lsh", n) for n in args.hashes] + ([] if args.no_full else [("full", 0)])
    print("| trained with | " + " | ".join(f"eval n_hashes={n}" for n in args.hashes) + " | train seconds |")
    print("|---|" + "---|" * len(args.hashes) + "---|")
    for kind, n in rows:
        accuracy, seconds = run(kind, n, args)
        name = f"LSH, n_hashes={n}" if kind == "lsh" else "full causal (shared QK)"
        cells = [f"**{100 * accuracy[e]:.1f}%**" if e == n else f"{100 * accuracy[e]:.1f}%" for e in args.hashes] \
            if kind == "lsh" else [f"{100 * accuracy[0]:.1f}% (full)"] + [""] * (len(args.hashes) - 1)
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
