"""The places where megatron-core 0.16.1 assumes CUDA, made to run on a machine without it.

Everything here is applied only when CUDA is absent, so GPU runs use megatron-core unchanged.

Three kinds of help:

* `autocast_parallel_linears_on_cpu()`: mixed precision (`execution.precision: bf16`, CPU autocast).
  megatron's parallel linear layers compute through two custom autograd Functions in
  `megatron.core.tensor_parallel.layers` (`LinearWithGradAccumulationAndAsyncCommunication`,
  `LinearWithFrozenWeight`) whose `forward`/`backward` are wrapped in
  `torch.amp.custom_fwd/custom_bwd(device_type="cuda")`: the backward re-enters the forward's
  *CUDA* autocast state only. Under CPU autocast the forward's matmul runs in bf16 (so the
  incoming gradient is bf16) while the backward runs without autocast on the saved fp32 weight:
  `grad_output.matmul(weight)` raises "expected m1 and m2 to have the same dtype". Without CUDA
  the two Functions' wrappers are rebuilt around the same undecorated methods (their
  `__wrapped__`) for `device_type="cpu"`, so the backward runs under the forward's CPU autocast,
  as it runs under the forward's CUDA autocast on a GPU. Process-wide, idempotent; called when a
  model is built (megalong/model/gpt.py).

* `keep_rotary_embedding_on_cpu(rotary)`: megatron's RoPE moves its inverse frequencies to
  `torch.cuda.current_device()` on its first forward; without CUDA, compute them where they are.
  Applied to that one object only.

* `enable()`: process-wide, for megatron's pipeline schedules and point-to-point communication,
  which allocate their receive buffers with `device="cuda"` / `torch.cuda.current_device()`, call
  `Tensor.cuda()` (tied embeddings across stages), and use CUDA streams, events and
  `torch.cuda.synchronize()`; and for megatron's DDP buffers and optimizers (data parallelism,
  megalong/train/megatron_dp.py), which allocate on `torch.cuda.current_device()` and accept only
  weights whose `Tensor.type()` is a "torch.cuda.*Tensor". It pushes a `TorchFunctionMode` that
  rewrites CUDA device arguments (a "cuda" string, a CUDA `torch.device` or a bare device index)
  to the CPU, turns `Tensor.cuda()` into a no-op and reports CPU tensors' `type()` as their CUDA
  names, and installs no-op stand-ins for `torch.cuda.Stream`, `Event`,
  `stream`, `current_stream`, `synchronize` and `current_device` (which returns index 0, mapped to
  the CPU by the mode). `torch.cuda.is_available()` stays False, so megatron's own CPU branches
  are still taken. The training loop calls it when the layout has pipeline stages or more than
  one data-parallel rank.

Private megatron-core API touched: `tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication`
and `LinearWithFrozenWeight` (their `forward`/`backward` and the `__wrapped__` of their decorators),
`models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_emb` (replaced per object),
`tensor_parallel.random._get_all_rng_states/_set_all_rng_states` (`enable_cpu_recompute`).
"""
from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED: "_CudaArgsToCpu | None" = None


def _megatron_linear_functions() -> tuple[type, ...]:
    from megatron.core.tensor_parallel import layers

    return (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight)


def autocast_parallel_linears_on_cpu() -> bool:
    """Let megatron's parallel linear layers' backward run under the forward's CPU autocast (see
    the module's docstring). Returns whether the patch is active (False where CUDA is available)."""
    if torch.cuda.is_available():
        return False
    for function in _megatron_linear_functions():
        if getattr(function, "_megalong_cpu_autocast", False):
            continue
        # `custom_fwd/custom_bwd` keep the undecorated method as `__wrapped__` (functools.wraps).
        forward = getattr(function.forward, "__wrapped__", function.forward)
        backward = getattr(function.backward, "__wrapped__", function.backward)
        function.forward = staticmethod(torch.amp.custom_fwd(forward, device_type="cpu"))
        function.backward = staticmethod(torch.amp.custom_bwd(backward, device_type="cpu"))
        function._megalong_cpu_autocast = True
    return True


def _rotary_emb_in_place(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    # megatron's RotaryEmbedding.get_emb, minus its move of `inv_freq` to the current CUDA device.
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if self.rotary_interleaved:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def keep_rotary_embedding_on_cpu(rotary: torch.nn.Module) -> None:
    """megatron's RoPE moves its inverse frequencies to `torch.cuda.current_device()` at the first
    forward, which raises without CUDA. Without CUDA, compute them where they are."""
    if not torch.cuda.is_available():
        rotary.get_emb = types.MethodType(_rotary_emb_in_place, rotary)


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


def enable_cpu_recompute() -> bool:
    """megatron-core's activation recompute (`tensor_parallel.checkpoint`) saves and restores the
    CUDA RNG state beside the CPU's, which raises without CUDA. Without CUDA, keep the CPU state
    and megatron's (CUDA-less, empty) RNG tracker only. Returns whether the patch is active."""
    if torch.cuda.is_available():
        return False
    from megatron.core.tensor_parallel import random as tp_random

    def get_states():
        return torch.get_rng_state(), None, tp_random.get_cuda_rng_tracker().get_states()

    def set_states(cpu_state, cuda_state, tracker_states):
        torch.set_rng_state(cpu_state)
        tp_random.get_cuda_rng_tracker().set_states(tracker_states)

    tp_random._get_all_rng_states = get_states
    tp_random._set_all_rng_states = set_states
    return True



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
