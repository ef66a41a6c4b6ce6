"""megalong's own sampler: greedy, temperature and top-k sampling from a checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from megalong.model.gpt import build_model, position_ids_for


def load_for_inference(checkpoint: str | Path):
    """(model, config, tokenizer) on the CPU, one process; TP shards are merged first."""
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.parallel.distributed import initialize
    from megalong.train.checkpoint import load_merged_state, single_process_config

    info, state = load_merged_state(checkpoint)
    cfg = single_process_config(info.config)
    initialize(1)
    model = build_model(cfg, info.meta["tokenizer_vocab_size"])
    model.load_state_dict(state)
    return model.eval(), cfg, SentencePieceTokenizer(info.path / "tokenizer.model")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, eod: Optional[int] = None,
             vocab_size: Optional[int] = None, seed: Optional[int] = None) -> list[int]:
    """Continue prompt_ids; temperature 0 is greedy. Ids >= vocab_size (padding) are never chosen."""
    if not prompt_ids:
        raise ValueError("generate: the prompt must hold at least one token")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    max_len = model.max_sequence_length
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_len:]])
        logits = model(context, position_ids_for(context), None)[0, -1].float()
        if vocab_size is not None:
            logits = logits[:vocab_size]
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        ids.append(next_id)
        if eod is not None and next_id == eod:
            break
    return ids[len(prompt_ids):]


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step_* directory, or a save_dir (its newest checkpoint)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)


def run_generate(args: argparse.Namespace) -> Optional[int]:
    model, _, tokenizer = load_for_inference(args.checkpoint)
    new = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, args.temperature,
                   args.top_k, tokenizer.eod, tokenizer.vocab_size, args.seed)
    print(args.prompt + tokenizer.decode(new))
    return 0
