"""MoE layer speed: fwd+bwd TFLOP/s on active FLOPs, beside a dense MLP with the same active FLOPs,
in one run. The MoE layer's experts are the loop over local experts (the fallback path; the
kernels issue adds a grouped GEMM).

    python bench/moe.py                      # on the GPU: 8 and 64 experts, top-1/2, 16k-64k tokens, h 768/2048
    python bench/moe.py --experts 8 --tokens 16384 --hidden 768   # a subset of the sizes
    python bench/moe.py --device cpu --small # a quick check that the script runs
    python bench/moe.py --check-args         # no GPU: build each row's layer on the meta device, print the rows

Record the printed table in bench/RESULTS.md with the date and device.
"""
from __future__ import annotations

import argparse
import itertools
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def timed(fn, device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_args(rows: list[tuple[int, int, int, int]]) -> None:
    """Without a GPU: each row's MoE layer builds (on the meta device: no memory); print the rows."""
    from megalong.moe.layer import MoELayer

    for E, k, T, h in rows:
        with torch.device("meta"):
            MoELayer(layer_config(h), options=moe_options(E, k))
        print(f"  experts {E}, top-{k}, {T} tokens, hidden {h}")
    print(f"bench/moe.py would time these {len(rows)} rows")


def layer_config(h: int) -> SimpleNamespace:
    # each expert as wide as the dense MLP (4h): active FLOPs = k x dense
    return SimpleNamespace(hidden_size=h, ffn_hidden_size=4 * h, gated_linear_unit=False, init_method_std=0.02,
                           num_layers=12, activation_func=lambda v: F.gelu(v, approximate="tanh"))


def moe_options(E: int, k: int) -> dict:
    return {"num_experts": E, "top_k": k, "dropless": True, "capacity_factor": None}


def main() -> None:
    from megalong.moe.layer import MoELayer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="default 16384 65536 (256 with --small)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="default 768 2048 (64 with --small)")
    parser.add_argument("--check-args", action="store_true",
                        help="check the arguments, build each row's layer on the meta device, print the rows, exit")
    args = parser.parse_args()
    tokens_list = args.tokens or ([256] if args.small else [16384, 65536])
    hidden_list = args.hidden or ([64] if args.small else [768, 2048])
    for name, values in (("experts", args.experts), ("top-k", args.top_k), ("tokens", tokens_list),
                         ("hidden", hidden_list)):
        if min(values) < 1:
            parser.error(f"--{name}: every value must be >= 1")
    if max(args.top_k) > min(args.experts):
        parser.error(f"--top-k {max(args.top_k)} exceeds --experts {min(args.experts)}")
    rows = list(itertools.product(args.experts, args.top_k, tokens_list, hidden_list))
    if args.check_args:
        check_args(rows)
        return
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/moe.py: no CUDA GPU here (--device cpu --small or --check-args check the script)")
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} | torch {torch.__version__} | {dtype}")
    print("| experts | top-k | tokens | hidden | MoE ms | MoE TFLOP/s | dense MLP ms | dense TFLOP/s | MoE / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for E, k, T, h in rows:
        f = 4 * h
        try:
            moe = MoELayer(layer_config(h), options=moe_options(E, k)).to(device=device, dtype=dtype)
            moe.router.float()
            x = torch.randn(T, 1, h, device=device, dtype=dtype, requires_grad=True)

            def moe_step():
                out, _ = moe(x)
                out.float().sum().backward()

            dense_w1 = torch.randn(h, k * f, device=device, dtype=dtype, requires_grad=True)
            dense_w2 = torch.randn(k * f, h, device=device, dtype=dtype, requires_grad=True)

            def dense_step():
                (F.gelu(x @ dense_w1, approximate="tanh") @ dense_w2).float().sum().backward()

            flops = 3 * 2 * T * (2 * h * k * f)  # fwd + bwd (2x) of two matmuls per active expert
            t_moe, t_dense = timed(moe_step, device), timed(dense_step, device)
            print(f"| {E} | {k} | {T} | {h} | {1e3 * t_moe:.2f} | {flops / t_moe / 1e12:.1f} | {1e3 * t_dense:.2f} | "
                  f"{flops / t_dense / 1e12:.1f} | {t_dense / t_moe:.2f} |", flush=True)
        except torch.OutOfMemoryError:
            print(f"| {E} | {k} | {T} | {h} | out of memory | | | | |")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
