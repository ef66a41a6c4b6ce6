"""megatron-core 0.16.1's CUDA-only paths of the model itself, made to run without CUDA (every
function here is a no-op where CUDA is available), and its checkpoint writer's result queue.

* `autocast_parallel_linears_on_cpu()`: mixed precision (bf16 under CPU autocast).
  megatron's parallel linear layers compute through two custom autograd Functions in
  `megatron.core.tensor_parallel.layers` (`LinearWithGradAccumulationAndAsyncCommunication`,
  `LinearWithFrozenWeight`) whose `forward`/`backward` are wrapped in
  `torch.amp.custom_fwd/custom_bwd(device_type="cuda")`: the backward re-enters the forward's
  *CUDA* autocast state only. Under CPU autocast the forward's matmul runs in bf16 (so the
  incoming gradient is bf16) while the backward runs without autocast on the saved fp32 weight:
  `grad_output.matmul(weight)` raises "expected m1 and m2 to have the same dtype". Without CUDA
  the two Functions' wrappers are rebuilt around the same undecorated methods (their
  `__wrapped__`) for `device_type="cpu"`, so the backward runs under the forward's CPU autocast,
  as it runs under the forward's CUDA autocast on a GPU. Process-wide, idempotent.

* `enable_cpu_recompute()`: megatron's activation recompute (`tensor_parallel.checkpoint`) saves
  and restores the CUDA RNG state beside the CPU's (`tensor_parallel.random._get_all_rng_states`
  / `_set_all_rng_states`), which raises without CUDA. Without CUDA, keep the CPU state and
  megatron's (CUDA-less, empty) RNG tracker only. Process-wide.

* `keep_rotary_embedding_on_cpu(rotary)`: megatron's RoPE (`RotaryEmbedding.get_emb`) moves its
  inverse frequencies to `torch.cuda.current_device()` on its first forward; without CUDA,
  compute them where they are. Applied to that one object only.

* `results_queue_in_process()`: megatron's dist-checkpoint file writer
  (`dist_checkpointing.strategies.filesystem_async`) reports back through a queue that it
  creates on first use from a `spawn` multiprocessing Manager: a new interpreter that re-imports
  the main module (seconds, and megatron again under torchrun). megalong saves synchronously, so
  writer and reader are this very process, and a plain thread-safe queue does (GPU or not).
"""
from __future__ import annotations

import types

import torch


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


def enable_cpu_recompute() -> bool:
    """Activation recompute without CUDA (see the module's docstring). Returns whether the patch
    is active."""
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


def results_queue_in_process() -> None:
    """megatron's checkpoint writer reports through a queue of this process (see the docstring)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
