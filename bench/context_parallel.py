"""Context parallelism on the CPU (gloo processes): what each attention kind sends per layer, and
the longest sequence one training step fits at CP = 1, 2, 4 within a fixed memory budget per
process.

    OMP_NUM_THREADS=1 python bench/context_parallel.py            # CP = 1, 2, 4; Markdown tables
    OMP_NUM_THREADS=1 python bench/context_parallel.py --quick    # a smoke run (small sizes)

1. Communication: one attention layer (b = 1, h heads of width d, float32) forward and backward on
   each rank's chunk of an L-token sequence; the bytes each rank received, counted by the send /
   receive / all-gather helpers themselves (megalong/parallel/comm_bytes.py), the largest over
   the ranks.
2. Memory: one training step (forward, backward, SGD update) of one transformer block (qkv
   projection, the attention kind, output projection, 4x MLP) on each rank's chunk, its peak
   tracked allocations (every tensor an operator creates while it is alive: the allocator's peak
   without caching, tests/attention/helpers.py's MemoryTracker), the largest over the ranks. The
   longest L (a multiple of 64 x N) whose step stays within --budget-mib, by doubling then
   bisection. fam runs its whole layer, the FAM chain included, as fam.py's `run_fam_layer` (in
   the communication table too: its halo and state handoff are exchanged inside the layer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

KINDS = {  # name: (kind, options)
    "global (ring)": ("global", {}),
    "local w=256": ("local", {"window": 256}),
    "local w=256, 16 global tokens": ("local", {"window": 256, "global_tokens": 16}),
    "local w=1024, dilation 4": ("local", {"window": 1024, "dilation": 4}),
    "linear elu": ("linear", {"chunk_size": 64}),
    "lsh bucket 64, 2 hashes": ("lsh", {"bucket_size": 64, "n_hashes": 2}),
    "axial, rows of 64": ("axial", {}),  # axial_shape [L / 64, 64], set by the length
    "fam B=64, m=1, F=8": ("fam", {"block_size": 64, "memory_segments": 1, "fam_length": 8}),
}
COMM_KINDS = list(KINDS)
MEMORY_KINDS = ("local w=256", "linear elu", "global (ring)", "fam B=64, m=1, F=8")


def module_for(name: str, heads: int, head_dim: int, length: int):
    from attention.helpers import attention_config
    from megalong.attention.registry import CORE_ATTENTION

    kind, options = KINDS[name]
    if kind == "axial":
        options = {"axial_shape": [length // 64, 64]}
    return CORE_ATTENTION[kind](attention_config(heads, head_dim), layer_number=1, **options)


def communication(name: str, length: int, heads: int, head_dim: int) -> dict[str, int]:
    import torch.distributed as dist
    from megalong.parallel import comm_bytes
    from megalong.parallel.context import context_size

    n = context_size()
    g = torch.Generator().manual_seed(0)
    if KINDS[name][0] == "fam":  # its exchanges happen in the layer (the FAM chain), not the core module
        block = Block(name, heads * head_dim, heads, length)
        x = torch.randn(length // n, 1, heads * head_dim, generator=g, requires_grad=True)
        dist.barrier()
        comm_bytes.reset()
        out = block(x)
    else:
        module = module_for(name, heads, head_dim, length)
        h = 2 * heads if KINDS[name][1].get("global_tokens") else heads
        q, k, v = (torch.randn(length // n, 1, h, head_dim, generator=g, requires_grad=True) for _ in range(3))
        dist.barrier()
        comm_bytes.reset()
        out = module(q, k, v, attention_mask=None)
    forward = sum(comm_bytes.received().values())
    out.backward(torch.randn_like(out))
    total = sum(comm_bytes.received().values())
    sizes = torch.tensor([forward, total - forward], dtype=torch.float64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    return {"forward": int(sizes[0]), "backward": int(sizes[1])}


class Block(torch.nn.Module):
    """qkv projection, the attention kind, output projection, 4x MLP; a `fam` block runs them as
    fam's layer does (megalong/attention/fam.py `run_fam_layer`: the FAM tokens through the same
    weights block by block, its learned initial FAM a parameter)."""

    def __init__(self, name: str, hidden: int, heads: int, length: int):
        super().__init__()
        self.heads = heads
        self.fam = KINDS[name][0] == "fam"
        self.global_heads = 2 if KINDS[name][1].get("global_tokens") else 1
        self.qkv = torch.nn.Linear(hidden, 3 * hidden * self.global_heads)
        self.attention = module_for(name, heads, hidden // heads, length)
        self.out = torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))
        fam_length = KINDS[name][1].get("fam_length", 0) if self.fam else 0
        self.fam_init = torch.nn.Parameter(torch.randn(fam_length, hidden) * 0.02) if fam_length else None

    def project(self, x: torch.Tensor):
        s, b, _ = x.shape
        return self.qkv(x).view(s, b, 3, self.heads * self.global_heads, -1).unbind(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fam:
            from megalong.attention.fam import run_fam_layer

            return run_fam_layer(x, self.fam_init, self.attention, self.project,
                                 lambda context, residual: residual + self.out(context), lambda h: h + self.mlp(h))
        q, k, v = self.project(x)
        x = x + self.out(self.attention(q, k, v, attention_mask=None))
        return x + self.mlp(x)


def step_memory(name: str, length: int, hidden: int, heads: int) -> int:
    import torch.distributed as dist
    from attention.helpers import MemoryTracker
    from megalong.parallel.context import context_size

    torch.manual_seed(0)
    block = Block(name, hidden, heads, length)
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-3)
    x = torch.randn(length // context_size(), 1, hidden)
    tracker = MemoryTracker()
    with tracker:
        loss = block(x).square().mean()
        loss.backward()
        optimizer.step()
        del loss
    peak = torch.tensor([float(tracker.peak)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def longest(name: str, budget: int, hidden: int, heads: int, start: int, limit: int) -> tuple[int, int]:
    """(the longest L that fits, its peak bytes) by doubling then bisection on multiples of `start`."""
    fits, fits_peak, length = 0, 0, start
    while length <= limit:
        peak = step_memory(name, length, hidden, heads)
        if peak > budget:
            break
        fits, fits_peak, length = length, peak, 2 * length
    low, high = fits, min(length, limit + start)
    while high - low > start and fits:
        mid = (low + high) // 2 // start * start
        peak = step_memory(name, mid, hidden, heads)
        if peak <= budget:
            low, fits, fits_peak = mid, mid, peak
        else:
            high = mid
    return fits, fits_peak


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    n = dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=n)
    torch.set_grad_enabled(True)
    records = []
    if n > 1 and not args.memory_only:
        for name in COMM_KINDS:
            sizes = communication(name, args.comm_length, args.heads, args.head_dim)
            records.append({"part": "comm", "cp": n, "kind": name, **sizes})
    budget = args.budget_mib * 2 ** 20
    for name in [] if args.comm_only else args.memory_kinds:
        fits, peak = longest(name, budget, args.hidden, args.heads, 64 * n, args.max_length)
        records.append({"part": "memory", "cp": n, "kind": name, "length": fits, "peak": peak})
    if dist.get_rank() == 0:
        for record in records:
            print("RECORD " + json.dumps(record), flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def communication_table(records: list[dict], args: argparse.Namespace) -> None:
    print(f"Communication per layer per rank (L = {args.comm_length}, b = 1, {args.heads} heads x "
          f"{args.head_dim}, float32), KiB received, forward / backward:\n")
    sizes = [n for n in args.sizes if n > 1]
    print("| kind | " + " | ".join(f"CP={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in COMM_KINDS:
        cells = [next(f"{r['forward'] / 1024:.0f} / {r['backward'] / 1024:.0f}" for r in records
                      if r["part"] == "comm" and r["kind"] == name and r["cp"] == n) for n in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--comm-length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1 << 17)
    parser.add_argument("--memory-only", action="store_true", help="skip the communication table")
    parser.add_argument("--comm-only", action="store_true", help="skip the memory table")
    parser.add_argument("--memory-kinds", nargs="+", default=list(MEMORY_KINDS), choices=list(KINDS))
    args = parser.parse_args()
    if args.quick:
        args.comm_length, args.budget_mib, args.max_length = 1024, 8, 1 << 13
    if args.worker:
        return worker(args)
    records = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29600 + n), __file__, "--worker", *sys.argv[1:]]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        records += [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
    if not args.memory_only:
        communication_table(records, args)
    if args.comm_only:
        return
    print(f"\nLongest L of one training step of one block (hidden {args.hidden}, {args.heads} heads) within "
          f"{args.budget_mib} MiB of tracked allocations per process (its peak, MiB):\n")
    print("| kind | " + " | ".join(f"CP={n}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in args.memory_kinds:
        cells = [next(f"{r['length']} ({r['peak'] / 2 ** 20:.1f})" for r in records
                      if r["part"] == "memory" and r["kind"] == name and r["cp"] == n) for n in args.sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
