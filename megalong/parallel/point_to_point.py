"""Differentiable point-to-point exchanges between the ranks of the context-parallel group, for
the kinds whose state runs from rank to rank (megalong/attention/context_fam.py). Every message
received is counted (megalong/parallel/comm_bytes.py, labels `fam halo` and `fam state`).

Every exchange here sends forward to later ranks and back (gradients) to earlier ones; a rank
only ever waits on receives, from earlier ranks in the forward and from later ranks in the
backward, so no two ranks wait on each other. Sends are posted and not waited on (gloo's send
completes only once the receiver has posted its receive): their handles and tensors are kept in
`_PENDING` and waited on at the next forward exchange (never in a backward: a rank waiting there
on a send to an earlier rank could wait on a rank that waits on it). By the next forward every
receiver has posted: a forward only waits on earlier ranks, which have sent, and a rank only
starts a forward after every backward it took part in (the gradient all-reduce syncs the step).
That is why fam has its own halo here: local attention's (context_p2p.halo_before) waits on its
sends, which inside fam's backward could wait on a rank that waits for this one's state gradient.

A forward recomputed inside the backward (model.reversible, activation recompute) does flush there,
safely: what is pending then are the later layers' gradients to earlier ranks (received in those
layers' backward) and their recomputed halos and states to later ranks (received in those layers'
recomputation), and neither waits on the layer this rank is recomputing; every rank reruns the
same layers in the same order (tests/test_context_recompute.py). Not traced by torch.compile.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.parallel import comm_bytes
from megalong.parallel.context import context_group, context_rank, context_size

# Tags: one stream per purpose, so that messages between one pair of ranks match in order.
HALO, HALO_GRAD, STATE, STATE_GRAD = 11, 12, 13, 14
LABELS = {HALO: "fam halo", HALO_GRAD: "fam halo (backward)", STATE: "fam state", STATE_GRAD: "fam state (backward)"}
_PENDING: list[tuple[Any, torch.Tensor]] = []


def _global(rank: int) -> int:
    return parallel_state.get_context_parallel_global_ranks()[rank]


def _flush() -> None:
    while _PENDING:
        work, _ = _PENDING.pop()
        work.wait()


def _send(x: torch.Tensor, to: int, tag: int) -> None:
    x = x.contiguous()
    _PENDING.append((dist.isend(x, dst=_global(to), group=context_group(), tag=tag), x))


def _receive(like: torch.Tensor, shape: tuple[int, ...], source: int, tag: int) -> torch.Tensor:
    out = like.new_empty(shape)
    dist.recv(out, src=_global(source), group=context_group(), tag=tag)
    comm_bytes.count(LABELS[tag], out)
    return out


def _halo_plan(chunk: int, halo: int, rank: int, n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(what this rank sends: (to rank, from offset, length) of its chunk; what it receives: (from
    rank, offset in that rank's chunk, length), in sequence order). A rank q needs the positions
    [max(0, q * chunk - halo), q * chunk)."""
    sends, receives = [], []
    for q in range(rank + 1, n):
        lo = max(rank * chunk, q * chunk - halo)
        if lo < (rank + 1) * chunk:
            sends.append((q, lo - rank * chunk, (rank + 1) * chunk - lo))
    for p in range(rank):
        lo = max(p * chunk, rank * chunk - halo)
        if lo < (p + 1) * chunk:
            receives.append((p, lo - p * chunk, (p + 1) * chunk - lo))
    return sends, receives


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, halo: int, dim: int) -> torch.Tensor:
        _flush()
        C, r, n = x.shape[dim], context_rank(), context_size()
        sends, receives = _halo_plan(C, halo, r, n)
        ctx.plan, ctx.dim, ctx.shape = (sends, receives), dim, x.shape
        for to, offset, length in sends:
            _send(x.narrow(dim, offset, length), to, HALO)
        parts = []
        for source, _, length in receives:
            shape = list(x.shape)
            shape[dim] = length
            parts.append(_receive(x, tuple(shape), source, HALO))
        if not parts:
            return x.narrow(dim, 0, 0).clone()
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        sends, receives = ctx.plan
        dim = ctx.dim
        start = 0
        for source, _, length in receives:  # the gradients of what earlier ranks sent, back to them
            _send(grad.narrow(dim, start, length), source, HALO_GRAD)
            start += length
        out = grad.new_zeros(ctx.shape)
        for to, offset, length in sends:
            shape = list(ctx.shape)
            shape[dim] = length
            out.narrow(dim, offset, length).add_(_receive(grad, tuple(shape), to, HALO_GRAD))
        return out, None, None


@torch.compiler.disable
def halo_before(x: torch.Tensor, halo: int, dim: int) -> torch.Tensor:
    """The `halo` positions of the sequence just before this rank's chunk `x` along `dim` (fewer
    near the start; from several earlier ranks when `halo` is longer than a chunk), sent by each
    earlier rank directly: (halo / chunk rounded up) messages at most per rank. Differentiable."""
    if context_size() == 1:
        return x.narrow(dim, 0, 0)
    out = _Halo.apply(x, halo, dim)
    assert isinstance(out, torch.Tensor)
    return out


class _ReceiveState(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        _flush()
        return _receive(like, shape, context_rank() - 1, STATE)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        _send(grad, context_rank() - 1, STATE_GRAD)
        return None, None, None


class _SendState(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, state: torch.Tensor) -> torch.Tensor:
        _flush()
        _send(state.detach(), context_rank() + 1, STATE)
        ctx.shape = state.shape
        return state.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return _receive(grad, tuple(ctx.shape), context_rank() + 1, STATE_GRAD)


@torch.compiler.disable
def receive_state(anchor: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The state the previous context rank sent (`send_state`), of `shape` and `like`'s dtype.
    Its gradient goes back to that rank in the backward. `anchor`, a tensor of this rank's graph
    that needs a gradient whenever the sent state does (the sender waits for that gradient), is
    what ties the receive into autograd (it gets no gradient)."""
    out = _ReceiveState.apply(anchor, like, shape)
    assert isinstance(out, torch.Tensor)
    return out


@torch.compiler.disable
def send_state(state: torch.Tensor) -> torch.Tensor:
    """Send `state` to the next context rank; returns a zero scalar to add to a tensor this
    rank's loss depends on: its backward waits for the gradient of `state` from the next rank,
    once the gradient of that tensor is complete (so add it where that happens late)."""
    out = _SendState.apply(state)
    assert isinstance(out, torch.Tensor)
    return out
