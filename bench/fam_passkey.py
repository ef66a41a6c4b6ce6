"""Passkey retrieval with TransformerFAM (Hwang et al. 2024): a digit marked by a KEY token is placed
further back than any block sliding-window attention (BSWA) layer stack can see; at the end an ASK
token must name it. `fam` (megalong's `run_fam_layer` + `FamAttention`, the code megatron's
FamTransformerLayer runs) against the same model without feedback memory (fam_length 0, BSWA).

    python bench/fam_passkey.py [--steps 600] [--seeds 0] [--length 64] [--block 8] [--memory 1]
        [--layers 2] [--lr 3e-3] [--warmup 50] [--curriculum 0] [--eval-every 100]
        [--json out.json] [--plot out.png]
    python bench/fam_passkey.py --plot out.png --from-json out.json   # redraw from measured output

The passkey sits at least `length - 2 - max_position` tokens before the question, more than the
BSWA stack's receptive field of layers x (memory + 1) x block tokens. Training and held-out
sequences only ever hold the key beyond that field. `--curriculum N` widens the key's range over
the first N steps: it starts at the positions just beyond the field (the nearest the task allows)
and grows linearly to [0, max_position); both models get the same sequences. The learning rate
warms up linearly over `--warmup` steps, then follows a cosine to 0 at `--steps`.

Every `--eval-every` steps both models are scored on the same 1024 held-out sequences (accuracy,
loss); at the end accuracy is also measured per key distance on 256 held-out sequences per
distance. `--json` writes all of it, `--plot` draws accuracy over steps and over distance.
"""
from __future__ import annotations

import argparse
import json
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


def batch(n: int, args: argparse.Namespace, g: torch.Generator, low: int = 0,
          where: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` sequences, the KEY at a position in [low, max_position) (or at `where`), its digit next."""
    x = torch.randint(DIGITS, DIGITS + FILLER, (n, args.length), generator=g)
    digit = torch.randint(0, DIGITS, (n,), generator=g)
    if where is None:
        where = torch.randint(low, args.max_position, (n,), generator=g)
    rows = torch.arange(n)
    x[rows, where], x[rows, where + 1], x[:, -1] = KEY, digit, ASK
    return x, digit


def distance(where: int, args: argparse.Namespace) -> int:
    """Tokens from the passkey digit (at where + 1) back from the ASK token (at length - 1)."""
    return args.length - 1 - (where + 1)


def curriculum_low(step: int, args: argparse.Namespace) -> int:
    if step >= args.curriculum:
        return 0
    return round((args.max_position - 1) * (1 - step / args.curriculum))


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(part) for part in x.split(256)])
    model.train()
    return (logits.argmax(-1) == y).double().mean().item(), F.cross_entropy(logits, y).item()


def run(fam_length: int, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    model = Model(args, fam_length)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    held_x, held_y = batch(1024, args, torch.Generator().manual_seed(10_000 + seed))
    curve: list[list[float]] = []
    train_seconds = 0.0
    for step in range(args.steps):
        start = time.time()
        warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch(args.batch, args, g, low=curriculum_low(step, args))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_seconds += time.time() - start
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accuracy, held_loss = score(model, held_x, held_y)
            curve.append([step + 1, accuracy, held_loss])
            print(f"  fam_length {fam_length} seed {seed} step {step + 1}: accuracy {100 * accuracy:.1f}% "
                  f"loss {held_loss:.3f} ({train_seconds:.0f} s)", flush=True)
    by_distance = {}
    g = torch.Generator().manual_seed(20_000 + seed)
    for where in range(args.max_position):
        x, y = batch(256, args, g, where=torch.full((256,), where))
        by_distance[distance(where, args)] = score(model, x, y)[0]
    return {"fam_length": fam_length, "seed": seed, "steps": args.steps, "accuracy": curve[-1][1],
            "loss": curve[-1][2], "train_seconds": train_seconds, "curve": curve, "by_distance": by_distance}


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (over_steps, over_distance) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {True: "tab:blue", False: "tab:red"}
    for r in results["runs"]:
        fam = r["fam_length"] > 0
        label = f"{'FAM' if fam else 'BSWA, no FAM'} seed {r['seed']}"
        steps, accuracy = [p[0] for p in r["curve"]], [100 * p[1] for p in r["curve"]]
        style = ["-", "--", ":", "-."][r["seed"] % 4]
        over_steps.plot(steps, accuracy, style, color=colors[fam], label=label)
        by_distance = sorted((int(d), 100 * a) for d, a in r["by_distance"].items())  # json keys are strings
        over_distance.plot(*zip(*by_distance), style, color=colors[fam], label=label)
    for ax in (over_steps, over_distance):
        ax.axhline(100 / DIGITS, color="gray", lw=0.8, ls=":")
        ax.set_ylim(-3, 103)
        ax.set_ylabel("passkey accuracy %")
    over_steps.set(title="held-out accuracy over training", xlabel="training step")
    reach = results["args"]["receptive_field"]
    over_distance.set(title=f"accuracy by key distance (BSWA field: {reach} tokens)",
                      xlabel="tokens from the passkey to the question")
    over_distance.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def table(results: dict) -> None:
    print("| model | seed | steps | passkey accuracy | held-out loss | train seconds |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        name = f"fam, fam_length={r['fam_length']}" if r["fam_length"] else "block sliding window, no FAM"
        print(f"| {name} | {r['seed']} | {r['steps']} | {100 * r['accuracy']:.1f}% | {r['loss']:.3f} | "
              f"{r['train_seconds']:.0f} |")


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
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--curriculum", type=int, default=0,
                        help="steps over which the key's range widens from just beyond the field to all of it")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", choices=("fam", "bswa"), nargs="+", default=["fam", "bswa"])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--max-position", type=int, default=None,
                        help="the KEY token lies in [0, max_position); default: just outside BSWA's reach")
    parser.add_argument("--json", default=None, help="write the measured results here")
    parser.add_argument("--plot", default=None, help="draw accuracy over steps and over distance (PNG)")
    parser.add_argument("--from-json", nargs="+", default=None,
                        help="only redraw --plot (and the table) from these --json outputs")
    args = parser.parse_args()
    if args.from_json:
        results = {"runs": []}
        for path in args.from_json:
            with open(path) as f:
                part = json.load(f)
            results["args"] = part["args"]
            results["runs"] += part["runs"]
        table(results)
        if args.plot:
            plot(results, args.plot)
        return
    reach = args.layers * (args.memory + 1) * args.block
    if args.max_position is None:
        args.max_position = args.length - 2 - reach - 1
    if args.max_position < 1:
        raise SystemExit(f"--length {args.length} leaves no room beyond the BSWA reach of {reach} tokens")
    gap = distance(args.max_position - 1, args)
    print(f"passkey at least {gap} tokens before the question; BSWA receptive field {reach} tokens "
          f"({args.layers} layers x (memory {args.memory} + 1) x block {args.block}); chance {100 / DIGITS:.0f}%")
    results = {"args": {**vars(args), "receptive_field": reach}, "runs": []}
    lengths = {"fam": args.fam_length, "bswa": 0}
    for seed in args.seeds:
        for name in args.models:
            results["runs"].append(run(lengths[name], seed, args))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    table(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
