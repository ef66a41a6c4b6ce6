"""Kernel selection: whether a module runs its Triton kernel or its torch path.

`execution.kernels: auto` (the default) runs a kernel when its tensors are on CUDA, Triton imports and
the kernel covers the case (no attention dropout, supported shapes); `reference` always runs the
torch path. The mode is process-wide: the model builder calls `set_mode(config.execution.kernels)`.

The modules that use a kernel (megalong/attention/*, megalong/moe/router.py and layer.py) ask
`use_kernels(q, dropout=...)` once per call and run everything but the inner operation the same way
on both paths; only that operation is the kernel (wrapped in `eager`) or its torch equivalent.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

import torch

MODES = ("auto", "reference")
_mode = "auto"

F = TypeVar("F", bound=Callable)


def set_mode(mode: str) -> None:
    """`auto` or `reference` (config key `execution.kernels`)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"execution.kernels: '{mode}' is not one of {', '.join(MODES)}")
    _mode = mode


def get_mode() -> str:
    return _mode


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_kernels(*tensors: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether the Triton path should run for these tensors."""
    return (_mode == "auto" and dropout == 0.0 and all(t.is_cuda for t in tensors)
            and triton_available())


def eager(fn: F) -> F:
    """For the functions that launch Triton kernels: they run eagerly inside a torch.compile'd layer
    (`execution.compile`): dynamo stops its graph before them and resumes after, instead of tracing the
    launches (the kernels are fused already; tracing them is what fails, e.g. under the interpreter)."""
    return torch.compiler.disable(fn, recursive=True)  # type: ignore[return-value]
