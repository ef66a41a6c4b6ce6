"""Every patch megalong makes to megatron-core, DeepSpeed and Triton internals, in one place.

Entry point: `install(cuda_on_cpu=..., deepspeed=...)`, called where a run needs it (building a
model: megalong/model/gpt.py; pipeline stages: megalong/parallel/distributed.py; the megatron
engine's data parallelism: megalong/train/loop.py; the DeepSpeed engine:
megalong/train/deepspeed_engine.py). It is idempotent, sets no environment variable at import
(only `install(deepspeed=True)` sets DeepSpeed's, when a DeepSpeed run starts), and everything but
the dist-checkpoint queue and the Triton interpreter fix is a no-op where CUDA is available. Two
patches are not process-wide and are called where they apply: `keep_rotary_embedding_on_cpu(rotary)`
(one RoPE object) and `cuda_on_cpu_temporarily()` (a block). The Triton interpreter fix is applied
by megalong/kernels/__init__.py (kernels also run outside a run: tests, bench), and by `install`.

The patches, and the private APIs each touches (pinned in `PINS`, the versions of setup.py they
were written for; tests/test_compat.py checks the installed versions and that every attribute
in `PATCHED` exists):

| module            | patch                                  | private API touched                       |
|-------------------|----------------------------------------|-------------------------------------------|
| megatron_cpu.py   | parallel linears under CPU autocast    | megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication / LinearWithFrozenWeight `.forward/.backward` (their `__wrapped__`) |
| megatron_cpu.py   | activation recompute without CUDA      | megatron.core.tensor_parallel.random `_get_all_rng_states`, `_set_all_rng_states` |
| megatron_cpu.py   | RoPE frequencies left on the CPU       | megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding `.get_emb` (per object) |
| megatron_cpu.py   | dist-checkpoint results queue in-process | megatron.core.dist_checkpointing.strategies.filesystem_async `._results_queue` |
| cuda_on_cpu.py    | CUDA device arguments -> CPU, stand-in streams/events | torch.cuda `Stream`, `Event`, `stream`, `current_stream`, `default_stream`, `synchronize`, `current_device` (replaced); megatron's pipeline, p2p, DDP and optimizer code (unchanged, fed CPU tensors) |
| deepspeed_cpu.py  | CPU accelerator, no op builds          | deepspeed.ops `__compatible_ops__["deepspeed_shm_comm"]`; env DS_ACCELERATOR, LOCAL_RANK |
| triton_interpreter.py | loop bounds, bf16 `tl.dot` and cast under TRITON_INTERPRET=1 | triton.runtime.interpreter `_patch_lang_tensor`, `_convert_float`, `TensorHandle`, `InterpreterBuilder.create_dot/.cast_impl` |

Not here: megalong/train/library_loads.py swaps torch.distributed.checkpoint.filesystem's `pickle`
inside `pickles_without_code()`; that is the checkpoint-trust policy, not a compatibility fix.
"""
from __future__ import annotations

from megalong.compat.cuda_on_cpu import cuda_on_cpu_temporarily
from megalong.compat.megatron_cpu import keep_rotary_embedding_on_cpu, results_queue_in_process
from megalong.compat.triton_interpreter import patch_interpreter
from megalong.compat.versions import PATCHED, PINS

__all__ = ["PATCHED", "PINS", "cuda_on_cpu_temporarily", "install", "keep_rotary_embedding_on_cpu",
           "patch_interpreter", "results_queue_in_process"]


def install(*, cuda_on_cpu: bool = False, deepspeed: bool = False) -> None:
    """Apply the process-wide patches this process needs (idempotent).

    Always: megatron's parallel linears under CPU autocast and its activation recompute without
    CUDA (both no-ops with CUDA), the Triton interpreter fix (only under TRITON_INTERPRET=1).
    `cuda_on_cpu`: megatron's pipeline/communication/DDP code on the CPU (no-op with CUDA).
    `deepspeed`: DeepSpeed's CPU accelerator without op builds; call it before importing DeepSpeed."""
    from megalong.compat import cuda_on_cpu as cuda_mode
    from megalong.compat import megatron_cpu

    megatron_cpu.autocast_parallel_linears_on_cpu()
    megatron_cpu.enable_cpu_recompute()
    patch_interpreter()
    if cuda_on_cpu:
        cuda_mode.enable()
    if deepspeed:
        from megalong.compat.deepspeed_cpu import prepare_deepspeed

        prepare_deepspeed()
