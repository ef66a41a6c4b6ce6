"""`execution.compile`: torch.compile applied to each transformer layer, in place.

Layers are compiled one by one (as torchtitan compiles blocks), not the whole GPTModel: a layer is
the region where compilation pays (norms, bias, activation and residual adds fused around the
matmuls and attention), while the embedding, the vocab-parallel loss and megatron's pipeline
plumbing stay eager. `Module.compile` keeps the module and its parameter names, so checkpoints,
exports and megatron-core DDP see the same model as without compilation.

Reversible stacks (model/reversible.py) never call a layer as a whole: they run its attention and
MLP branches inside their own autograd Function, so there those two sub-modules are compiled.

megatron-core 0.16.1's RowParallelLinear passes `tp_group=None` to its linear function, which then
warns (a DeprecationWarning) on every call; a warning inside a compiled region would split its
graph, so dynamo is told to drop `warnings.warn` calls it traces.

At context parallelism the exchanges between ranks are not traced (megalong/parallel/context.py):
a compiled layer's graph breaks at each one.
"""
from __future__ import annotations

import warnings

import torch


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer layer of `model` (a GPTModel, or a DDP wrapper of one) in place
    with torch.compile's `backend`. Returns how many modules were compiled."""
    from megalong.model.reversible import ReversibleTransformerBlock

    decoder = getattr(model, "module", model).decoder
    config = torch._dynamo.config
    config.ignore_logging_functions.add(warnings.warn)
    # Layers share their forward's code, so each distinct layer (attention kind, MLP or MoE)
    # is one more cache entry of it; past the limit dynamo would quietly run the rest eagerly.
    config.recompile_limit = max(config.recompile_limit, 4 * len(decoder.layers))
    if isinstance(decoder, ReversibleTransformerBlock):
        modules = [m for layer in decoder.layers for m in (layer.self_attention, layer.mlp)]
    else:
        modules = list(decoder.layers)
    # dynamic=False: a new sequence length (eval, a shorter last batch) compiles one more static
    # graph; dynamo's automatic dynamic shapes would instead trace the layers with symbolic lengths,
    # and torch's SDPA decomposition then views the windowed blocks' expanded keys with a stride it
    # cannot view (RuntimeError, measured on torch 2.13 with local attention).
    for module in modules:
        module.compile(backend=backend, dynamic=False)
    return len(modules)
