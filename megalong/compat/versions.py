"""The library versions megalong's patches (megalong/compat/) were written for, as pinned in
setup.py, and the attributes they replace or read (tests/test_compat.py checks both against what is
installed, so an upgrade that moves one fails a test instead of a run)."""
from __future__ import annotations

# distribution name -> the requirement of setup.py (tests/test_compat.py reads setup.py too)
PINS: dict[str, str] = {
    "megatron-core": "==0.16.1",
    "deepspeed": "==0.19.8",
    "triton": "==3.6.0",
    "torch": ">=2.11,<2.14",
}

# (distribution, module, attribute path) of everything a patch replaces or relies on
PATCHED: tuple[tuple[str, str, str], ...] = (
    ("megatron-core", "megatron.core.tensor_parallel.layers",
     "LinearWithGradAccumulationAndAsyncCommunication.forward.__wrapped__"),
    ("megatron-core", "megatron.core.tensor_parallel.layers",
     "LinearWithGradAccumulationAndAsyncCommunication.backward.__wrapped__"),
    ("megatron-core", "megatron.core.tensor_parallel.layers", "LinearWithFrozenWeight.forward.__wrapped__"),
    ("megatron-core", "megatron.core.tensor_parallel.layers", "LinearWithFrozenWeight.backward.__wrapped__"),
    ("megatron-core", "megatron.core.tensor_parallel.random", "_get_all_rng_states"),
    ("megatron-core", "megatron.core.tensor_parallel.random", "_set_all_rng_states"),
    ("megatron-core", "megatron.core.tensor_parallel.random", "get_cuda_rng_tracker"),
    ("megatron-core", "megatron.core.models.common.embeddings.rotary_pos_embedding",
     "RotaryEmbedding.get_emb"),
    ("megatron-core", "megatron.core.models.common.embeddings.rotary_pos_embedding",
     "RotaryEmbedding.get_freqs_non_repeated"),
    ("megatron-core", "megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue"),
    ("deepspeed", "deepspeed.ops", "__compatible_ops__"),
    ("triton", "triton.runtime.interpreter", "_patch_lang_tensor"),
    ("triton", "triton.runtime.interpreter", "_convert_float"),
    ("triton", "triton.runtime.interpreter", "TensorHandle"),
    ("triton", "triton.runtime.interpreter", "InterpreterBuilder.create_dot"),
    ("triton", "triton.runtime.interpreter", "InterpreterBuilder.cast_impl"),
)
