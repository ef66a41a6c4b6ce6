"""An MoE layer at context parallelism against one process, in float64, on one torchrun job of 2
gloo processes (`python -m torch.distributed.run --nproc_per_node 2 tests/context_moe_driver.py`).
The references run first, before megatron-core's context group exists (one process's code path).

- Without drops, top-2 and noisy top-2 (its noise drawn for the whole sequence, each rank keeping
  its chunk's): each rank's output on its chunk, the aux loss (load balance and z-loss; importance
  and load) and, with every rank back-propagating N times its share of the output term plus the
  aux loss (the scales a training step uses), the gradients summed over the ranks / N equal one
  process on the whole sequence; the routing statistics summed over the context group are the
  whole sequence's.
- With a capacity that drops, and with expert-choice routing: each rank's output is the one-process
  layer's on that chunk alone (capacity per chunk), not the whole sequence's (which differs here),
  and the drops summed over the ranks are the sum of the chunks'.
Exits non-zero at the first mismatch."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from megalong.moe.layer import MoELayer
from megalong.parallel.context import rank_positions
from megalong.train.pipeline import whole_sequence_stats

S, B, H, E, N = 16, 2, 8, 4, 2
NO_DROPS = {"router": "topk", "top_k": 2, "capacity_factor": 2.0, "num_shared_experts": 1,
            "aux_loss_coeff": 0.3, "z_loss_coeff": 0.05}
DROPS = {"router": "topk", "top_k": 2, "capacity_factor": 0.75, "aux_loss_coeff": 0.3}
NOISY = {"router": "noisy_topk", "top_k": 2, "dropless": True, "capacity_factor": None, "aux_loss_coeff": 0.3}
EXPERT_CHOICE = {"router": "expert_choice", "top_k": 2, "capacity_factor": 1.0}


def layer(options: dict) -> MoELayer:
    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=H, ffn_hidden_size=16, gated_linear_unit=False, init_method_std=0.3,
                             num_layers=2, activation_func=lambda v: F.gelu(v, approximate="tanh"))
    m = MoELayer(config, options={"num_experts": E, "router_dtype": "fp64", **options}).double()
    for p in m.router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(S, B, H, dtype=torch.float64, generator=g),
            torch.randn(S, B, H, dtype=torch.float64, generator=g))


def step(m: MoELayer, x: torch.Tensor, w: torch.Tensor, scale: float):
    """Output, aux loss and the gradients (x first) of scale * sum(out * w) + aux."""
    x = x.clone().requires_grad_(True)
    out, _ = m(x)
    ((scale * (out * w).sum()) + m.aux_loss).backward()
    return out.detach(), m.aux_loss.detach(), [x.grad] + [p.grad for p in m.parameters()], m.stats


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-12) -> None:
    err = (a - b).abs().max().item()
    if not err < tol:
        raise SystemExit(f"MISMATCH {what}: {err}")


def main() -> None:
    x, w = inputs()
    references = {name: step(layer(options), x, w, 1.0) for name, options in (("top-2", NO_DROPS), ("noisy", NOISY))}
    chunked = {}
    for name, options in (("drops", DROPS), ("expert choice", EXPERT_CHOICE)):
        outs, drops = [], 0
        for r in range(N):
            m = layer(options)
            outs.append(m(x[rank_positions(r, N, S)])[0].detach())
            drops += int(m.stats.dropped)
        chunked[name] = (outs, drops, layer(options)(x)[0].detach())

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=N)
    rank = parallel_state.get_context_parallel_rank()
    mine = rank_positions(rank, N, S)
    for name, options in (("top-2", NO_DROPS), ("noisy", NOISY)):
        ref_out, ref_aux, ref_grads, ref_stats = references[name]
        out, aux, grads, stats = step(layer(options), x[mine], w[mine], float(N))
        close(out, ref_out[mine], f"{name}: output")
        close(aux, ref_aux, f"{name}: aux loss")
        close(grads[0], N * ref_grads[0][mine], f"{name}: gradient of this chunk's hidden states")
        for i, (got, want) in enumerate(zip(grads[1:], ref_grads[1:])):
            total = got.clone()
            dist.all_reduce(total)
            close(total / N, want, f"{name}: gradient of parameter {i}")
        whole = whole_sequence_stats(stats)
        if not (torch.equal(whole.load, ref_stats.load) and whole.assignments == ref_stats.assignments
                and int(whole.dropped) == int(ref_stats.dropped) == 0):
            raise SystemExit(f"MISMATCH {name}: routing statistics {whole} vs {ref_stats}")

    for name, options in (("drops", DROPS), ("expert choice", EXPERT_CHOICE)):
        outs, drops, whole_out = chunked[name]
        m = layer(options)
        out = m(x[mine])[0].detach()
        close(out, outs[rank], f"{name}: output of the chunk")
        summed = int(whole_sequence_stats(m.stats).dropped)
        differs = torch.tensor(float((out - whole_out[mine]).abs().max()))
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if not (summed == drops > 0 and differs.item() > 1e-3):  # the whole sequence's capacity drops others
            raise SystemExit(f"MISMATCH {name}: drops {summed}, per chunk {drops}, "
                             f"differs from the whole sequence's by {differs.item()}")
    if dist.get_rank() == 0:
        print("MoE at CP=2: aux loss and gradients equal one process, drops per chunk", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
