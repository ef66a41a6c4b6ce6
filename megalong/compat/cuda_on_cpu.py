"""megatron-core 0.16.1's pipeline schedules, point-to-point communication, DDP buffers and
optimizers, which assume CUDA, run on a machine without it.

`enable()` (process-wide, idempotent; `megalong.compat.install(cuda_on_cpu=True)`): megatron's
pipeline schedules and point-to-point communication allocate their receive buffers with
`device="cuda"` / `torch.cuda.current_device()`, call `Tensor.cuda()` (tied embeddings across
stages), and use CUDA streams, events and `torch.cuda.synchronize()`; megatron's DDP buffers and
optimizers (data parallelism, megalong/train/megatron_dp.py) allocate on
`torch.cuda.current_device()` and accept only weights whose `Tensor.type()` is a
"torch.cuda.*Tensor". It pushes a `TorchFunctionMode` that rewrites CUDA device arguments (a
"cuda" string, a CUDA `torch.device` or a bare device index) to the CPU, turns `Tensor.cuda()`
into a no-op and reports CPU tensors' `type()` as their CUDA names, and installs no-op stand-ins
for `torch.cuda.Stream`, `Event`, `stream`, `current_stream`, `default_stream`, `synchronize` and
`current_device` (which returns index 0, mapped to the CPU by the mode). `torch.cuda.is_available()`
stays False, so megatron's own CPU branches are still taken. Used when the layout has pipeline
stages or more than one data-parallel rank (megatron engine).

`cuda_on_cpu_temporarily()`: the same for the duration of a block, for megatron-core's
`dist_checkpointing.save` (megalong/train/dist_checkpoint.py).

Everything here is a no-op where CUDA is available.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED: "_CudaArgsToCpu | None" = None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaArgsToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept only "torch.cuda.*Tensor" weights.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _Event:
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()


def _stand_ins() -> dict[str, Any]:
    return {
        "Stream": _Stream,
        "Event": _Event,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "synchronize": lambda device=None: None,
        "current_device": lambda: 0,
    }


def enable() -> bool:
    """Let megatron-core's CUDA-only pipeline and communication code run on the CPU (idempotent).

    Returns whether the compatibility layer is active (False where CUDA is available)."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED is None:
        for name, stand_in in _stand_ins().items():
            setattr(torch.cuda, name, stand_in)
        _ENABLED = _CudaArgsToCpu()
        _ENABLED.__enter__()
    return True


def is_enabled() -> bool:
    return _ENABLED is not None


@contextlib.contextmanager
def cuda_on_cpu_temporarily():
    """What `enable()` does, for the duration of a block only (nothing if CUDA is available or
    `enable()` is already active). For megatron-core's `dist_checkpointing.save`, which copies
    to the host with `non_blocking` then calls `torch.cuda.synchronize()`, and puts a flag on
    `torch.cuda.current_device()` for its all-reduce of write failures."""
    if torch.cuda.is_available() or _ENABLED is not None:
        yield
        return
    originals = {name: getattr(torch.cuda, name) for name in _stand_ins()}
    for name, stand_in in _stand_ins().items():
        setattr(torch.cuda, name, stand_in)
    try:
        with _CudaArgsToCpu():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.cuda, name, original)
