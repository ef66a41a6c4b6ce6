"""The GPU architecture a kernel launch is tuned for, as one number (90 for sm_90, 80 for sm_80).

Launchers choose tile sizes, warps and stages per architecture through `device_arch`. The compile
gate (which has no GPU) runs the launchers on `meta` tensors inside `target_arch(90)` so that they
make the launches they would make on that GPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch

_target: Optional[int] = None


def device_arch(device: torch.device) -> int:
    """Compute capability of `device` as one number; 0 off CUDA (the interpreter), unless a
    `target_arch` block says which GPU to launch for."""
    if _target is not None:
        return _target
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@contextlib.contextmanager
def target_arch(arch: int) -> Iterator[None]:
    """Launchers inside this block tune for `arch` whatever device their tensors are on."""
    global _target
    previous, _target = _target, arch
    try:
        yield
    finally:
        _target = previous
