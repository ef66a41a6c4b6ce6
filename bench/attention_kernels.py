"""Attention kernels on one GPU: megalong's Triton kernels vs FlexAttention vs PyTorch SDPA.

Shapes of issue 8: 12 heads x 64, bf16, forward + backward, batch 1, L = 8192 and 32768; sliding
windows 256 and 1024 with and without ALiBi; full causal; causal linear attention from L = 4096.
Each line prints the median time of `--iters` timed steps (CUDA events) after warm-up.

    python bench/attention_kernels.py                  # everything
    python bench/attention_kernels.py --only window --lengths 8192
    python bench/attention_kernels.py --only window --check-args   # no GPU: the rows it would run

Needs CUDA (it exits with a message otherwise), except `--check-args`, which checks the arguments
and the imports, prints the rows the same arguments would time and exits (bench/gpu_check.sh
--dry-run). No figures from it are recorded until it has been
run on the lent GPU (see bench/RESULTS.md for how).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 12, 64


def timed(step: Callable[[], None], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `step` (forward + backward)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def qkv(L: int, batch: int = 1) -> list[torch.Tensor]:
    return [torch.randn(batch, HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    grad = torch.randn_like(inputs[0])

    def step() -> None:
        for x in inputs:
            x.grad = None
        fn(*inputs).backward(grad)
    return step


def slopes() -> torch.Tensor:
    from megalong.attention.alibi import alibi_slopes

    return alibi_slopes(HEADS).float().cuda()


def megalong_window(window: Optional[int], alibi: bool) -> Callable[..., torch.Tensor]:
    from megalong.kernels.window_attention import window_attention

    s = slopes() if alibi else None
    return lambda q, k, v: window_attention(q, k, v, HEAD_DIM ** -0.5, window, 1, s)[0]


def flex_window(L: int, window: Optional[int], alibi: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        return visible if window is None else visible & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, None, None, L, L, device="cuda")
    s = slopes()

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - s[h] * (q_idx - kv_idx)

    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, score_mod=alibi_mod if alibi else None)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def megalong_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from megalong.kernels.linear_attention import linear_attention

    return linear_attention(q.float(), k.float(), v.float()).to(v.dtype)


def torch_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from megalong.kernels.linear_attention import reference_linear_attention

    return reference_linear_attention(q.float(), k.float(), v.float()).to(v.dtype)


def report(name: str, L: int, ms: float, baseline: Optional[float] = None) -> None:
    ratio = f"  ({baseline / ms:.2f}x vs the first line)" if baseline else ""
    print(f"{name:<44} L={L:<6} {ms:8.3f} ms{ratio}", flush=True)


PARTS = ("window", "causal", "linear")


def planned_rows(parts: list[str], lengths: list[int], windows: list[int]) -> list[str]:
    """The rows `main` times for these arguments, in order (for --check-args)."""
    rows = []
    for L in lengths:
        if "window" in parts:
            for window in windows:
                for alibi in (False, True):
                    tag = f"window {window}{' + ALiBi' if alibi else ''}"
                    rows += [f"FlexAttention {tag} L={L}", f"megalong {tag} L={L}"]
        if "causal" in parts:
            rows += [f"SDPA causal L={L}", f"megalong causal L={L}", f"megalong causal + ALiBi L={L}"]
    if "linear" in parts:
        for L in sorted({4096, *lengths}):
            rows += [f"SDPA causal L={L}", f"megalong linear (Triton) L={L}", f"megalong linear (torch) L={L}"]
    return rows


def check_args(parts: list[str], args: argparse.Namespace) -> int:
    """Without a GPU: the imports the rows need resolve; print the rows."""
    import torch.nn.attention.flex_attention  # noqa: F401

    import megalong.attention.alibi  # noqa: F401
    import megalong.kernels.linear_attention  # noqa: F401
    import megalong.kernels.window_attention  # noqa: F401

    rows = planned_rows(parts, args.lengths, args.windows)
    print(f"bench/attention_kernels.py would time {len(rows)} rows ({args.iters} iterations each):")
    for row in rows:
        print(f"  {row}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments and imports, print the rows, exit (no GPU needed)")
    args = parser.parse_args(argv)
    for name in ("lengths", "windows"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name}: every value must be >= 1")
    if args.iters < 1:
        parser.error("--iters: must be >= 1")
    parts = args.only or list(PARTS)
    if args.check_args:
        return check_args(parts, args)
    if not torch.cuda.is_available():
        print("bench/attention_kernels.py needs CUDA: run it on the lent GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {HEADS} heads x {HEAD_DIM}, "
          "bf16, batch 1, forward + backward, median ms")
    for L in args.lengths:
        inputs = qkv(L)
        if "window" in parts:
            for window in args.windows:
                for alibi in (False, True):
                    tag = f"window {window}{' + ALiBi' if alibi else ''}"
                    flex = timed(fwd_bwd(flex_window(L, window, alibi), inputs), args.iters)
                    report(f"FlexAttention {tag}", L, flex)
                    report(f"megalong      {tag}", L, timed(fwd_bwd(megalong_window(window, alibi), inputs),
                                                            args.iters), flex)
        if "causal" in parts:
            sdpa = timed(fwd_bwd(sdpa_causal, inputs), args.iters)
            report("SDPA causal", L, sdpa)
            report("megalong causal (window kernel, no window)", L,
                   timed(fwd_bwd(megalong_window(None, False), inputs), args.iters), sdpa)
            report("megalong causal + ALiBi", L, timed(fwd_bwd(megalong_window(None, True), inputs), args.iters), sdpa)
    if "linear" in parts:
        for L in sorted({4096, *args.lengths}):
            inputs = qkv(L)
            sdpa = timed(fwd_bwd(sdpa_causal, inputs), args.iters)
            report("SDPA causal", L, sdpa)
            report("megalong linear (Triton, fp32 state)", L, timed(fwd_bwd(megalong_linear, inputs), args.iters), sdpa)
            report("megalong linear (torch chunked)", L, timed(fwd_bwd(torch_linear, inputs), args.iters), sdpa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
