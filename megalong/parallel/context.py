"""Context parallelism (`parallel.context: N`): one sample's sequence spread over the N ranks of
megatron-core's context-parallel group.

Rank r of the group holds, of every sample of its micro-batch (`split_batch`), with their true
position ids:
- `parallel.context_layout: contiguous` (the default): the chunk [r * L / N, (r + 1) * L / N);
- `zigzag` (every attention layer global): the pieces r and 2N - 1 - r of the sequence cut into 2N,
  so that every rank has the same share of the causal scores (ring attention's load balance).
The layout is process-wide (`set_layout`, from the config when the groups start). Attention kinds
exchange what they need of the other chunks (megalong/attention/context_attention.py); the loss is
the masked mean over the whole sequence (`context_loss`); megatron-core's DDP reduces gradients
over the data x context ranks (its `dp_cp` group) and divides by their number, which is why each
rank back-propagates N times its share of the loss.

The collectives here are autograd functions: an all-gather whose backward returns to every rank
the sum of the gradients of its own chunk (a reduce-scatter; with gloo, which has none, an
all-reduce and a slice).

Every exchange here, in context_p2p.py and point_to_point.py (and ring attention) is
`torch.compiler.disable`d: a layer compiled by `execution.compile` breaks its graph at it and runs
it eagerly (traced, comm_bytes' counters would become guards that change on every call, so dynamo
would recompile each call until its limit and then leave the layer eager).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.parallel import comm_bytes

LAYOUTS = ("contiguous", "zigzag")
_layout = "contiguous"


def set_layout(name: str) -> None:
    """How sequences are cut over the context ranks from now on (one of LAYOUTS)."""
    global _layout
    if name not in LAYOUTS:
        raise ValueError(f"parallel.context_layout: {name!r} is not one of {', '.join(LAYOUTS)}")
    _layout = name


def layout() -> str:
    return _layout


def rank_pieces(rank: int, n: int, length: int) -> list[tuple[int, int]]:
    """(start, length) of the contiguous pieces of a `length`-token sequence that context rank
    `rank` of `n` holds, in the order they are stored."""
    if _layout == "zigzag":
        piece = length // (2 * n)
        return [(rank * piece, piece), ((2 * n - 1 - rank) * piece, piece)]
    chunk = length // n
    return [(rank * chunk, chunk)]


def rank_positions(rank: int, n: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """The sequence positions context rank `rank` holds, in storage order."""
    return torch.cat([torch.arange(s, s + c, device=device) for s, c in rank_pieces(rank, n, length)])


def context_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def context_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_context_parallel_rank()


def context_group() -> Any:
    return parallel_state.get_context_parallel_group()


def split_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's chunk of every [b, s] entry of a batch (tokens, labels, loss mask, position and
    segment ids), with `position_ids` (0..s-1 unless the batch has its own) cut the same way, so
    each chunk keeps its true positions. The batch as it is at CP=1."""
    n = context_size()
    if n == 1:
        return batch
    tokens = batch["tokens"]
    s = tokens.shape[1]
    parts = 2 * n if _layout == "zigzag" else n
    if s % parts:
        raise ValueError(f"parallel.context: {parts} pieces ({_layout}) do not divide the sequence length {s}")
    out = dict(batch)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(s, device=tokens.device).unsqueeze(0).expand_as(tokens)
    pieces = rank_pieces(context_rank(), n, s)

    def cut(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v[:, a:a + c] for a, c in pieces], dim=1) if len(pieces) > 1 else v[:, pieces[0][0]:sum(pieces[0])]

    return {k: cut(v) if v.dim() >= 2 and v.shape[1] == s else v for k, v in out.items()}


@torch.compiler.disable
def all_gather(x: torch.Tensor, dim: int, group: Any, label: str = "all-gather") -> torch.Tensor:
    """Every rank's `x` of `group` concatenated along `dim` in rank order (no gradient)."""
    n = dist.get_world_size(group)
    comm_bytes.count(label, x, n - 1)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherChunks(torch.autograd.Function):
    """All-gather along `dim` in rank order; backward: each rank's chunk gets the gradients summed
    over the group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, label: str) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.label = dim, group, label
        return all_gather(x, dim, group, label)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        group, dim = ctx.group, ctx.dim
        n, r = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        parts = [p.contiguous() for p in grad.chunk(n, dim=dim)]
        comm_bytes.count(ctx.label + " (backward)", parts[r], n - 1)  # a reduce-scatter's share
        if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter
            dist.all_reduce(grad, group=group)
            return grad.chunk(n, dim=dim)[r].contiguous(), None, None, None
        out = torch.empty_like(parts[r])
        dist.reduce_scatter(out, parts, group=group)
        return out, None, None, None


@torch.compiler.disable
def gather_chunks(x: torch.Tensor, dim: int, label: str = "all-gather") -> torch.Tensor:
    """Every context rank's `x` concatenated along `dim` in rank order (differentiable)."""
    if context_size() == 1:
        return x
    if not x.requires_grad:
        return all_gather(x, dim, context_group(), label)
    out = _GatherChunks.apply(x, dim, context_group(), label)
    assert isinstance(out, torch.Tensor)
    return out


@torch.compiler.disable
def sum_over_context(x: torch.Tensor) -> torch.Tensor:
    """The sum over the context ranks of a tensor that needs no gradient."""
    if context_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=context_group())
    return x


class _SumOverContext(torch.autograd.Function):
    """All-reduce over the context group; backward: the all-reduce of the gradients (its adjoint)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def context_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the context ranks of each rank's `x` (a sum over its chunk), differentiable.
    The backward sums the gradients of the N ranks: a replicated consumer of the sum (a router's
    auxiliary loss of the whole sequence) gives each chunk N times its share of the gradient, the
    scale megatron-core's DDP expects, as `context_loss` does."""
    if context_size() == 1:
        return x
    if not x.requires_grad:
        return sum_over_context(x)
    out = _SumOverContext.apply(x, context_group())
    assert isinstance(out, torch.Tensor)
    return out


def context_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The masked mean of the per-token loss over the whole sequence (all context ranks): its value
    is the CP=1 loss on every rank; its gradient is N times this rank's share, the scale
    megatron-core's DDP expects (it averages over data x context ranks)."""
    mask = loss_mask.to(per_token.dtype)
    n = context_size()
    numerator = (per_token.float() * mask).sum()
    count = sum_over_context(mask.sum().float()).clamp(min=1)
    share = numerator / count
    total = sum_over_context(share)
    return n * share + (total - n * share).detach()
