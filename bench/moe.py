"""MoE layer speed: fwd+bwd TFLOP/s on active FLOPs, beside a dense MLP with the same active FLOPs,
in one run. The MoE layer's experts are the loop over local experts (the fallback path; the
kernels issue adds a grouped GEMM).

    python bench/moe.py                      # on the GPU: 8 and 64 experts, top-1/2, 16k-64k tokens, h 768/2048
    python bench/moe.py --device cpu --small # a quick check that the script runs

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


def main() -> None:
    from megalong.moe.layer import MoELayer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    experts_list, topk_list = (8, 64), (1, 2)
    tokens_list, hidden_list = ((16384, 65536), (768, 2048)) if not args.small else ((256,), (64,))
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} | torch {torch.__version__} | {dtype}")
    print("| experts | top-k | tokens | hidden | MoE ms | MoE TFLOP/s | dense MLP ms | dense TFLOP/s | MoE / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for E, k, T, h in itertools.product(experts_list, topk_list, tokens_list, hidden_list):
        f = 4 * h  # each expert as wide as the dense MLP: active FLOPs = k x dense
        config = SimpleNamespace(hidden_size=h, ffn_hidden_size=f, gated_linear_unit=False, init_method_std=0.02,
                                 num_layers=12, activation_func=lambda v: F.gelu(v, approximate="tanh"))
        try:
            moe = MoELayer(config, options={"num_experts": E, "top_k": k, "dropless": True,
                                            "capacity_factor": None}).to(device=device, dtype=dtype)
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
