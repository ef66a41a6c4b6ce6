"""Expert parallelism: each rank of megatron-core's expert-model-parallel group holds
num_experts / EP experts; tokens travel to their experts' rank and back with all-to-all.

Counts are exchanged first (every rank learns how many rows it will receive from every other),
then the rows. The autograd function sends gradients back along the reverse route.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows x[sum(send[:r]):sum(send[:r+1])] go to rank r; returns rows from every rank in rank order."""
    return _AllToAll.apply(x, send, recv, group)


@dataclass
class Exchange:
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    order: torch.Tensor  # received rows -> grouped by local expert
    local_counts: torch.Tensor  # rows per local expert


def plan_exchange(tokens_per_expert: torch.Tensor, ep_size: int, group) -> Exchange:
    """From the global per-expert counts of this rank's tokens, the all-to-all layout."""
    local_experts = tokens_per_expert.numel() // ep_size
    # counts[s, j]: rows rank s sends to my local expert j (after the exchange of counts).
    counts = torch.empty_like(tokens_per_expert)
    dist.all_to_all_single(counts, tokens_per_expert.contiguous(), group=group)
    counts = counts.view(ep_size, local_experts)
    send = tokens_per_expert.view(ep_size, local_experts).sum(1).tolist()
    recv = counts.sum(1).tolist()
    expert_of_row = torch.repeat_interleave(torch.arange(local_experts).repeat(ep_size), counts.reshape(-1).cpu())
    order = torch.argsort(expert_of_row, stable=True).to(tokens_per_expert.device)
    return Exchange(send, recv, order, counts.sum(0))


def _assemble(mine: torch.Tensor, owner: torch.Tensor, size: int, group) -> torch.Tensor:
    """All rows on every rank, from the rows each rank r holds for the positions where owner == r."""
    counts = [int((owner == r).sum()) for r in range(size)]
    padded = mine.new_zeros(max(counts), *mine.shape[1:])
    padded[: mine.shape[0]] = mine
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    out = mine.new_empty(owner.shape[0], *mine.shape[1:])
    for r in range(size):
        out[owner == r] = gathered[r][: counts[r]]
    return out


class _GatherRows(torch.autograd.Function):
    """Rows computed on each tensor-parallel rank -> all rows on every rank. Their consumers are
    replicated across TP ranks, so each rank's gradient of the whole is complete; keep our part."""

    @staticmethod
    def forward(ctx, mine: torch.Tensor, owner: torch.Tensor, rank: int, size: int, group) -> torch.Tensor:
        ctx.mask = owner == rank
        return _assemble(mine, owner, size, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.mask], None, None, None, None


class _SliceRows(torch.autograd.Function):
    """This TP rank's rows of a tensor replicated on the TP ranks. The gradient of the whole must be
    complete on every rank (as megatron keeps replicated activations), so the backward gathers the
    parts' gradients from every rank."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, owner: torch.Tensor, rank: int, size: int, group) -> torch.Tensor:
        ctx.owner, ctx.size, ctx.group = owner, size, group
        return rows[owner == rank]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _assemble(grad, ctx.owner, ctx.size, ctx.group), None, None, None, None


def gather_rows(mine: torch.Tensor, owner: torch.Tensor, rank: int, size: int, group) -> torch.Tensor:
    """Assemble rows that rank owner[i] computed (owner is the same on every rank)."""
    return _GatherRows.apply(mine, owner, rank, size, group)


def slice_rows(rows: torch.Tensor, owner: torch.Tensor, rank: int, size: int, group) -> torch.Tensor:
    """The rows this rank owns, with a backward that makes the full gradient whole on every rank."""
    return _SliceRows.apply(rows, owner, rank, size, group)
