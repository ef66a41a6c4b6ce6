"""The few collectives checkpoints need (each a no-op in one process): who writes a part that
several ranks hold, and what every rank knows."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def _many() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def everyone(value: Any) -> list:
    """`value` from every rank (collective), in rank order."""
    if not _many():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def first_holders(keys: list) -> list[bool]:
    """For each of this rank's keys, whether this is the lowest rank holding it (collective)."""
    first: dict = {}
    for rank, held in enumerate(everyone(keys)):
        for key in held:
            first.setdefault(key, rank)
    me = dist.get_rank() if dist.is_initialized() else 0
    return [first[key] == me for key in keys]


def first_holder(key: Any) -> bool:
    """Whether this is the lowest rank holding `key` (all ranks call this together)."""
    return first_holders([key])[0]


def union_over_ranks(entries: dict) -> dict:
    """The union of every rank's dict (each pipeline stage knows only its own layers)."""
    out: dict = {}
    for part in everyone(entries):
        out.update(part)
    return out
