"""megalong's own sampler: greedy, temperature and top-k sampling from a checkpoint.

It recomputes the whole context at every step (the exported `MegalongForCausalLM` keeps a cache
and gives the same greedy tokens) and crops the context to the model's max_position_embeddings.
Ids of the padded vocabulary (>= the tokenizer's vocabulary size) are never produced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megalong.model.gpt import build_model, position_ids_for


def load_for_inference(checkpoint: str | Path):
    """(model, config, tokenizer) on the CPU, one process; TP shards are merged first.

    The model carries `tokenizer_vocab_size`, which `generate` uses to keep padded ids out."""
    from megatron.core import parallel_state

    from megalong.parallel.distributed import initialize
    from megalong.train.checkpoint import (CheckpointError, read_checkpoint_info, single_process_config,
                                           whole_model_state)
    from megalong.train.checkpoint_files import checkpoint_tokenizer
    from megalong.train.model_state import load_weights

    info = read_checkpoint_info(checkpoint)
    tokenizer = checkpoint_tokenizer(info.path)
    state = whole_model_state(info)
    cfg = single_process_config(info.config)
    if (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() != 1):
        raise CheckpointError("load_for_inference builds a one-process (TP=1) model, but this process "
                              "already runs megatron with tensor parallelism "
                              f"{parallel_state.get_tensor_model_parallel_world_size()}; shut it down first")
    initialize(1)
    model = build_model(cfg, info.meta["tokenizer_vocab_size"])
    load_weights(model, state, str(info.path))
    model.tokenizer_vocab_size = tokenizer.vocab_size
    return model.eval(), cfg, tokenizer


def _check_arguments(prompt_ids: list[int], max_new_tokens: int, temperature: float,
                     top_k: Optional[int], vocab_size: Optional[int]) -> None:
    if not prompt_ids:
        raise ValueError("generate: the prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 (or None for no cut), got {top_k}")
    bad = [i for i in prompt_ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad:
        raise ValueError(f"generate: prompt ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, eod: Optional[int] = None,
             vocab_size: Optional[int] = None, seed: Optional[int] = None) -> list[int]:
    """The new ids continuing prompt_ids (at most max_new_tokens; stops after `eod`).

    temperature 0 is greedy; otherwise softmax(logits / temperature) is sampled, restricted to the
    top_k most likely ids when top_k is given, with a torch.Generator seeded by `seed`.
    Ids >= vocab_size (default: the model's `tokenizer_vocab_size`, set by load_for_inference)
    are the padding of the embedding table and are never chosen."""
    vocab_size = vocab_size if vocab_size is not None else getattr(model, "tokenizer_vocab_size", None)
    _check_arguments(prompt_ids, max_new_tokens, temperature, top_k, vocab_size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    max_len = model.max_sequence_length
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_len:]], device=device)
        logits = model(context, position_ids_for(context), None)[0, -1].float().cpu()
        if vocab_size is not None:
            logits = logits[:vocab_size]
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        ids.append(next_id)
        if eod is not None and next_id == eod:
            break
    return ids[len(prompt_ids):]
