"""Every attention kind of issue 3, forward + backward, beside PyTorch SDPA and FlexAttention.

bf16, 12 heads x 64, batch 1, L = 2k, 8k, 32k and 128k. Per (L, case): the median time of a
forward + backward over `--iters` timed steps after warm-up, and the peak memory the step allocates
beyond its inputs (torch.cuda.max_memory_allocated), or "OOM" when it does not fit (the run goes on).
All cases of one L run in the same process, so the rows compare directly.

The megalong rows run the core-attention modules exactly as the model does: constructed from the
registry with the kind's options as megalong/export/hf_attention.py does outside megatron, called on
[seq, batch, heads, head_dim] like megatron's SelfAttention calls them. `fam` runs the layer
function the model uses (`run_fam_layer`, the sequential FAM chain included) with identity
projections and no MLP, so that only attention is timed. On CUDA the modules take their Triton
kernels where they have one (`execution.kernels: auto`); `--kernels reference` times the pure-PyTorch
paths. FlexAttention gets the same mask (and ALiBi as a score_mod) wherever a mask can express the
kind: sliding window, per-head dilation, ALiBi, block sliding window (fam without FAM tokens);
global tokens with their own projections, lsh, linear, axial and FAM are not one mask and have no
FlexAttention row.

    python bench/attention.py                          # on the GPU: L = 2k, 8k, 32k, 128k
    python bench/attention.py --lengths 8192 --only local
    python bench/attention.py --device cpu --small     # smoke test of the script (tiny L)

On the CPU peak memory is not measured (no allocator statistics) and FlexAttention runs eagerly
(unfused): the smoke mode only checks that every case runs.
"""
from __future__ import annotations

import argparse
import gc
import warnings
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 12, 64
DILATIONS = [1] * 4 + [2] * 4 + [4] * 4  # per head (global head index)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # [s, b, h, d] -> [s, b, h*d]


@dataclass
class Case:
    name: str
    group: str  # for --only
    build: Callable[[int], Optional[Attend]]  # L -> step function, None when it does not apply at L
    heads: int = HEADS  # query heads handed in (local with global tokens: local + global heads)
    same_as: Optional[str] = None  # a FlexAttention row: the megalong row with the same mask


# ---- megalong modules, as the model builds them ------------------------------------------------

def core_attention(kind: str, options: Any, alibi: bool, L: int) -> torch.nn.Module:
    """The kind's core attention as megalong/export/hf_attention.py constructs it (TP size 1)."""
    from megalong.attention.options import ModelShape
    from megalong.attention.registry import CORE_ATTENTION

    if hasattr(options, "check"):
        options.check(ModelShape(seq_length=L, num_heads=HEADS, head_dim=HEAD_DIM, tensor_parallel=1))
    config = SimpleNamespace(num_attention_heads=HEADS, kv_channels=HEAD_DIM, hidden_size=HEADS * HEAD_DIM,
                             attention_dropout=0.0)
    return CORE_ATTENTION[kind](config, 1, softmax_scale=None, alibi=alibi,
                                pg_collection=SimpleNamespace(tp=SimpleNamespace(rank=lambda: 0, size=lambda: 1)),
                                **vars(options))


def megalong_case(kind: str, make_options: Callable[[int], Any], alibi: bool = False) -> Callable[[int], Attend]:
    def build(L: int) -> Attend:
        return core_attention(kind, make_options(L), alibi, L)
    return build


def fam_case(block_size: int, memory_segments: int, fam_length: int) -> Callable[[int], Attend]:
    """`run_fam_layer` with the given q, k, v for the block tokens (the residual stream x is q),
    identity projections for the FAM tokens, a residual add as the output projection and no MLP:
    the FAM chain and the blocks' attention, nothing else."""
    from megalong.attention.fam import run_fam_layer
    from megalong.attention.options import FamOptions

    def build(L: int) -> Optional[Attend]:
        if block_size * (memory_segments + 1) > L:
            return None
        attention = core_attention("fam", FamOptions(block_size, memory_segments, fam_length), False, L)
        fam_init = None
        if fam_length:
            fam_init = torch.nn.Parameter(torch.randn(fam_length, HEADS * HEAD_DIM, device=DEVICE, dtype=DTYPE))

        def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            s, b = q.shape[:2]
            x = q.reshape(s, b, HEADS * HEAD_DIM)

            def qkv(h: torch.Tensor):  # the block tokens: the given q, k, v; FAM tokens: q = k = v = h
                if h is x:
                    return q, k, v
                heads = h.view(h.shape[0], b, HEADS, HEAD_DIM)
                return heads, heads, heads
            # minus x: the attention output alone, like the other rows (the FAM chain keeps its residual)
            return run_fam_layer(x, fam_init, attention, qkv, lambda ctx, res: res + ctx, lambda h: h) - x
        return step
    return build


# ---- baselines -----------------------------------------------------------------------------------

def heads_first(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Attend:
    """A [b, h, s, d] attention called like a core attention ([s, b, h, d] in, [s, b, h*d] out)."""
    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = fn(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))
        return out.permute(2, 0, 1, 3).flatten(2)
    return step


def sdpa_causal(L: int) -> Attend:
    return heads_first(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def flex_case(mask: str, alibi: bool = False, window: int = 256, block: int = 256,
              memory_segments: int = 1) -> Callable[[int], Optional[Attend]]:
    """FlexAttention with the mask of a megalong kind: `causal`, `window` (sliding window),
    `dilated` (window with the per-head DILATIONS), `blocks` (fam without FAM tokens)."""
    def build(L: int) -> Optional[Attend]:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        from megalong.attention.alibi import alibi_slopes

        if mask == "blocks" and block * (memory_segments + 1) > L:
            return None
        dilation = torch.tensor(DILATIONS, device=DEVICE)

        def mask_mod(b, h, q_idx, kv_idx):
            distance = q_idx - kv_idx
            if mask == "causal":
                return distance >= 0
            if mask == "window":
                return (distance >= 0) & (distance < window)
            if mask == "dilated":
                d = dilation[h]
                return (distance >= 0) & (distance % d == 0) & (distance < window * d)
            q_block, kv_block = q_idx // block, kv_idx // block  # blocks: own causally + previous in full
            return (distance >= 0) & (q_block - kv_block <= memory_segments)

        block_mask = create_block_mask(mask_mod, None, None if mask != "dilated" else HEADS, L, L,
                                       device=DEVICE)
        slopes = alibi_slopes(HEADS).to(device=DEVICE, dtype=torch.float32)

        def alibi_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx)

        run = torch.compile(flex_attention) if COMPILE_FLEX else flex_attention
        return heads_first(lambda q, k, v: run(q, k, v, block_mask=block_mask,
                                               score_mod=alibi_mod if alibi else None))
    return build


def cases(window: int, bucket_size: int, block: int, fam_length: int) -> list[Case]:
    from megalong.attention.options import (AxialOptions, GlobalOptions, LinearOptions, LocalOptions,
                                            LshOptions)

    def axial(L: int) -> AxialOptions:
        rows = max(r for r in range(1, int(L ** 0.5) + 1) if L % r == 0)  # rows <= cols, ~sqrt(L)
        return AxialOptions(axial_shape=[rows, L // rows])

    w = f"window {window}"
    return [
        Case("SDPA causal", "global", sdpa_causal),
        Case("FlexAttention causal", "global", flex_case("causal"), same_as="megalong global"),
        Case("megalong global", "global", megalong_case("global", lambda L: GlobalOptions())),
        Case("FlexAttention causal + ALiBi", "global", flex_case("causal", alibi=True),
             same_as="megalong global + ALiBi"),
        Case("megalong global + ALiBi", "global", megalong_case("global", lambda L: GlobalOptions(), alibi=True)),
        Case(f"FlexAttention {w}", "local", flex_case("window", window=window), same_as=f"megalong local {w}"),
        Case(f"megalong local {w}", "local", megalong_case("local", lambda L: LocalOptions(window=window))),
        Case(f"FlexAttention {w} + ALiBi", "local", flex_case("window", alibi=True, window=window),
             same_as=f"megalong local {w} + ALiBi"),
        Case(f"megalong local {w} + ALiBi", "local",
             megalong_case("local", lambda L: LocalOptions(window=window), alibi=True)),
        Case(f"FlexAttention {w}, dilation 1/2/4", "local", flex_case("dilated", window=window),
             same_as=f"megalong local {w}, dilation 1/2/4"),
        Case(f"megalong local {w}, dilation 1/2/4", "local",
             megalong_case("local", lambda L: LocalOptions(window=window, dilation=DILATIONS))),
        Case(f"megalong local {w}, 16 global tokens", "local",
             megalong_case("local", lambda L: LocalOptions(window=window, global_tokens=16)), heads=2 * HEADS),
        Case("megalong linear (elu)", "linear", megalong_case("linear", lambda L: LinearOptions())),
        Case("megalong linear (efficient)", "linear",
             megalong_case("linear", lambda L: LinearOptions(normalization="efficient"))),
        Case(f"megalong lsh, bucket {bucket_size}, 2 hashes", "lsh",
             megalong_case("lsh", lambda L: LshOptions(n_hashes=2, bucket_size=bucket_size))),
        Case(f"megalong lsh, bucket {bucket_size}, 4 hashes", "lsh",
             megalong_case("lsh", lambda L: LshOptions(n_hashes=4, bucket_size=bucket_size))),
        Case("megalong axial (rows x cols ~ sqrt L)", "axial", megalong_case("axial", axial)),
        Case("megalong axial + ALiBi", "axial", megalong_case("axial", axial, alibi=True)),
        Case(f"FlexAttention block sliding window {block}, 1 memory block", "fam",
             flex_case("blocks", block=block, memory_segments=1), same_as=f"megalong fam {block}, 1 memory block, no FAM"),
        Case(f"megalong fam {block}, 1 memory block, no FAM", "fam", fam_case(block, 1, 0)),
        Case(f"megalong fam {block}, 1 memory block, FAM {fam_length}", "fam", fam_case(block, 1, fam_length)),
    ]


# ---- measuring -------------------------------------------------------------------------------------

DEVICE = torch.device("cpu")
DTYPE = torch.bfloat16
COMPILE_FLEX = False


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(case: Case, L: int, iters: int, warmup: int) -> str:
    """'ms | GiB' of one case at L, or why it has no figure."""
    inputs = grad = None
    try:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = case.build(L)
        if step is None:
            return "n/a | n/a"
        inputs = [torch.randn(L, 1, case.heads, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
                  for _ in range(3)]
        grad = torch.randn(L, 1, HEADS * HEAD_DIM, device=DEVICE, dtype=DTYPE)
        if DEVICE.type == "cuda":
            synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        backward, note = True, ""
        if DEVICE.type == "cpu":
            try:
                step(*inputs)
            except NotImplementedError as error:  # FlexAttention has no backward on the CPU
                if "backward" not in str(error):
                    raise
                backward, note = False, " (fwd only)"
                inputs = [x.detach() for x in inputs]
        times = []
        for i in range(warmup + iters):
            for x in inputs:
                x.grad = None
            synchronize()
            start = time.perf_counter()
            if backward:
                step(*inputs).backward(grad)
            else:
                with torch.no_grad():
                    step(*inputs)
            synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        ms = f"{1e3 * statistics.median(times):.1f}{note}"
        gib = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f}" if DEVICE.type == "cuda" else "n/a"
        return f"{ms} | {gib}"
    except (RuntimeError, torch.OutOfMemoryError) as error:  # noqa: B014 (OOM may be either)
        if is_oom(error):
            return "OOM | OOM"
        raise
    finally:
        del inputs, grad
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def check_masks(selected: list[Case], L: int) -> None:
    """Each FlexAttention row's forward equals its megalong row's (float64, on the CPU): the same mask."""
    global DEVICE, DTYPE
    saved, (DEVICE, DTYPE) = (DEVICE, DTYPE), (torch.device("cpu"), torch.float64)
    try:
        by_name = {c.name: c for c in selected}
        q, k, v = (torch.randn(L, 1, HEADS, HEAD_DIM, dtype=torch.float64) for _ in range(3))
        for case in selected:
            if case.same_as in by_name:
                flex, ours = case.build(L), by_name[case.same_as].build(L)
                if flex is None or ours is None:
                    continue
                diff = (flex(q, k, v) - ours(q, k, v)).abs().max().item()
                if diff > 1e-5:  # ALiBi slopes are float32 in the score_mod
                    raise SystemExit(f"{case.name} differs from {case.same_as} by {diff:.2e} at L={L}")
                print(f"# checked: {case.name} = {case.same_as} (max |diff| {diff:.1e}, L={L}, float64)")
    finally:
        DEVICE, DTYPE = saved


def main(argv: Optional[list[str]] = None) -> None:
    global DEVICE, DTYPE, COMPILE_FLEX
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true",
                        help="smoke test: L = 256 and 512, window 32, bucket 16, block 64, FAM 8, 1 iteration")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 2048 8192 32768 131072")
    parser.add_argument("--only", action="append", choices=["global", "local", "linear", "lsh", "axial", "fam"])
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10, 1 with --small)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--check", action="store_true",
                        help="first check each FlexAttention row against its megalong row (CPU, float64; "
                             "on by default with --small)")
    parser.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                        help="megalong's Triton kernels on CUDA (auto) or its pure-PyTorch paths")
    args = parser.parse_args(argv)

    from megalong.cli import quiet_megatron_warnings

    quiet_megatron_warnings()
    from megalong.kernels import select

    select.set_mode(args.kernels)
    DEVICE = torch.device(args.device)
    DTYPE = getattr(torch, args.dtype)
    COMPILE_FLEX = DEVICE.type == "cuda"
    if not COMPILE_FLEX:  # eager FlexAttention warns that it is unfused: known, said in the header
        warnings.filterwarnings("ignore", module="torch.nn.attention.flex_attention")
    lengths = args.lengths or ([256, 512] if args.small else [2048, 8192, 32768, 131072])
    iters = args.iters or (1 if args.small else 10)
    warmup = 1 if args.small else 3
    sizes = dict(window=32, bucket_size=16, block=64, fam_length=8) if args.small else \
        dict(window=256, bucket_size=64, block=256, fam_length=64)
    selected = [c for c in cases(**sizes) if not args.only or c.group in args.only]

    if args.check or args.small:
        check_masks(selected, 320 if args.small else 1280)  # a partial last block/window on purpose
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {HEADS} heads x {HEAD_DIM}, {str(DTYPE).split('.')[-1]}, "
          f"batch 1, forward + backward, median of {iters} after {warmup} warm-up; kernels: {args.kernels}; "
          "memory: peak allocated beyond the inputs")
    print("\n| case | " + " | ".join(f"ms @{L} | GiB @{L}" for L in lengths) + " |")
    print("|---|" + "---|---|" * len(lengths))
    for case in selected:
        cells = [measure(case, L, iters, warmup) for L in lengths]
        print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
