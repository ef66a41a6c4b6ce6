"""Bytes received by this process through the context-parallel collectives and point-to-point
messages (megalong/parallel/context.py, context_p2p.py), by label: what a layer really sends, as
bench/context_parallel.py reports it."""
from __future__ import annotations

import torch

_RECEIVED: dict[str, int] = {}


def count(label: str, tensor: torch.Tensor, copies: int = 1) -> None:
    """Record that `copies` tensors like `tensor` arrived at this process under `label`."""
    _RECEIVED[label] = _RECEIVED.get(label, 0) + copies * tensor.numel() * tensor.element_size()


def received() -> dict[str, int]:
    """Bytes received per label since the last `reset`."""
    return dict(_RECEIVED)


def reset() -> None:
    _RECEIVED.clear()
