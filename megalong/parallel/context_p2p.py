"""Point-to-point messages between the ranks of the context-parallel group: the ring of ring
attention (each rank sends to the next and receives from the previous) and the halo of local
attention (the tail of a chunk to the next rank or ranks). Every message is counted in
megalong/parallel/comm_bytes.py. Plain isend/irecv (gloo and NCCL both have them); not traced by
torch.compile (context.py)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megalong.parallel import comm_bytes
from megalong.parallel.context import context_group, context_rank, context_size


class Pending:
    """Messages in flight; `wait` returns the received tensors in the order they were asked for."""

    def __init__(self, works: list[Any], received: list[torch.Tensor]):
        self.works, self.received = works, received

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


@torch.compiler.disable
def exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
             label: str) -> Pending:
    """Start sending each (context rank, tensor) of `sends` and receiving into each (context rank,
    buffer) of `recvs`; the buffers come back from `wait`."""
    group = context_group()
    works = []
    for peer, buffer in recvs:
        comm_bytes.count(label, buffer)
        works.append(dist.irecv(buffer, src=dist.get_global_rank(group, peer), group=group))
    for peer, tensor in sends:
        works.append(dist.isend(tensor.contiguous(), dst=dist.get_global_rank(group, peer), group=group))
    return Pending(works, [buffer for _, buffer in recvs])


@torch.compiler.disable
def ring_shift(x: torch.Tensor, label: str) -> Pending:
    """Send `x` to the next context rank and receive the previous rank's (same shape) around the ring."""
    n, r = context_size(), context_rank()
    return exchange([((r + 1) % n, x)], [((r - 1) % n, torch.empty_like(x))], label)


def halo_lengths(halo: int, chunk: int) -> list[int]:
    """How many of its last positions a rank sends to the rank t = 1, 2, ... after it: all of its
    chunk while the halo reaches past it, the rest of the halo for the farthest."""
    lengths, t = [], 1
    while (t - 1) * chunk < halo:
        lengths.append(min(chunk, halo - (t - 1) * chunk))
        t += 1
    return lengths


def _halo_send(x: torch.Tensor, halo: int, dim: int, label: str) -> torch.Tensor:
    """The `halo` positions before this rank's chunk (fewer near the sequence start), received from
    the previous rank(s), in position order."""
    n, r, C = context_size(), context_rank(), x.shape[dim]
    sends, recvs = [], []
    for t, length in enumerate(halo_lengths(halo, C), start=1):
        if r + t < n:
            sends.append((r + t, x.narrow(dim, C - length, length)))
        if r - t >= 0:
            shape = list(x.shape)
            shape[dim] = length
            recvs.append((r - t, x.new_empty(shape)))
    parts = exchange(sends, recvs, label).wait()
    if not parts:
        return x.narrow(dim, 0, 0)
    return torch.cat(parts[::-1], dim=dim)  # farthest rank first


class _Halo(torch.autograd.Function):
    """Forward: the halo before this chunk from the previous ranks; backward: its gradient sent
    back to them, each rank adding what the next ranks return into its own tail."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, halo: int, dim: int, label: str) -> torch.Tensor:
        ctx.halo, ctx.dim, ctx.label, ctx.chunk = halo, dim, label, x.shape[dim]
        return _halo_send(x, halo, dim, label)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        n, r, C, dim = context_size(), context_rank(), ctx.chunk, ctx.dim
        lengths = halo_lengths(ctx.halo, C)
        sends, recvs, offset = [], [], grad.shape[dim]
        for t, length in enumerate(lengths, start=1):  # the halo holds rank r - t's part at its end - ...
            if r - t >= 0:
                offset -= length
                sends.append((r - t, grad.narrow(dim, offset, length)))
            if r + t < n:
                shape = list(grad.shape)
                shape[dim] = length
                recvs.append((r + t, grad.new_empty(shape)))
        parts = exchange(sends, recvs, ctx.label + " (backward)").wait()
        shape = list(grad.shape)
        shape[dim] = C
        out = grad.new_zeros(shape)
        for part in parts:
            length = part.shape[dim]
            out.narrow(dim, C - length, length).add_(part)
        return out, None, None, None


@torch.compiler.disable
def halo_before(x: torch.Tensor, halo: int, dim: int, label: str) -> torch.Tensor:
    """The (up to) `halo` positions of the sequence just before this rank's chunk of `x` along
    `dim`, from the previous rank(s) by point-to-point (differentiable when `x` needs a gradient).
    The contiguous layout only."""
    if halo <= 0 or context_size() == 1:
        return x.narrow(dim, 0, 0)
    if not x.requires_grad:
        return _halo_send(x, halo, dim, label)
    out = _Halo.apply(x, halo, dim, label)
    assert isinstance(out, torch.Tensor)
    return out
