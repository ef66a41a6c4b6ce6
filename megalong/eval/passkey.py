"""`megalong eval CHECKPOINT --passkey --seq-length 1k 4k ...`: synthetic passkey retrieval at each
length and depth, beside held-out perplexity at each length (the long-context report).

A prompt of exactly L tokens (Mohtashami & Jaggi 2023's passkey test): a repeated filler text,
with " The pass key is K. Remember it. K is the pass key." placed so that it starts at `depth`
(0: first, 1: last) of the filler, then " What is the pass key? The pass key is" and the key's
tokens " K" (K a random 5-digit number). A trial is right when the model's greedy continuation of
the question is the key's tokens, read in one forward as the argmax at each key position
(teacher forcing gives the same tokens greedy decoding would while they are right). Any attention
kind, any layout: it runs through `EvalModel.score`."""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from megalong.evaluate import EvalError

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """(tokens of one trial, exactly `length` of them, and how many of the last are the key's)."""
    filler, marked = tokenizer.encode(FILLER), tokenizer.encode(needle(key))
    question, answer = tokenizer.encode(QUESTION), tokenizer.encode(f" {key}")
    room = length - len(marked) - len(question) - len(answer)
    if room < 0:
        raise EvalError(f"--seq-length: {length} tokens cannot hold the passkey prompt "
                        f"({length - room} tokens without filler)")
    text = (filler * (room // max(1, len(filler)) + 1))[:room]
    at = int(round(depth * room))
    return text[:at] + marked + text[at:] + question + answer, len(answer)


def passkey_accuracy(model: Any, length: int, depth: float, trials: int, seed: int = 0,
                     batch_size: int = 4) -> float:
    """The share of `trials` random keys whose tokens are all the model's argmax."""
    rng = random.Random(f"{seed}-{length}-{depth}")
    prompts = [passkey_prompt(model.tokenizer, length, depth, rng.randrange(10000, 100000)) for _ in range(trials)]
    right = 0
    for start in range(0, trials, batch_size):
        part = prompts[start:start + batch_size]
        tokens = torch.tensor([ids for ids, _ in part])
        targets = torch.roll(tokens, -1, dims=1)
        scores = model.score(tokens, targets)
        for row, (_, n) in enumerate(part):
            # positions length-n-1 .. length-2 predict the n key tokens
            right += bool(scores.greedy[row, length - n - 1:length - 1].all())
    return right / trials


def stream_loss(model: Any, stream: np.ndarray, length: int, batch_size: int) -> tuple[float, int]:
    """Mean loss over `stream` cut into windows of `length`, every token after a window's first
    scored (megalong/evaluate.py's perplexity, documents masked as there, through EvalModel at
    any layout)."""
    windows = len(stream) // length
    if windows == 0:
        raise EvalError(f"--seq-length: {length} is longer than the {len(stream)} held-out tokens")
    tokens = torch.from_numpy(stream[:windows * length].copy()).view(windows, length)
    total, count = 0.0, 0
    for start in range(0, windows, batch_size):
        batch = tokens[start:start + batch_size]
        scores = model.score(batch, torch.roll(batch, -1, dims=1), packed=True)
        total += float(-scores.logprob[:, :-1].double().sum())
        count += batch[:, 1:].numel()
    return total / count, count


def long_context_report(model: Any, lengths: list[int], depths: list[float], trials: int, max_tokens: int,
                        data: Optional[str] = None, batch_size: int = 4) -> list[dict]:
    """Per length: held-out loss and perplexity, and passkey accuracy at every depth."""
    import math

    from megalong.evaluate import held_out_tokens

    m = model.cfg.model
    for n in lengths:
        if m.position_embedding == "learned" and n > m.max_position_embeddings:
            raise EvalError(f"--seq-length: {n} exceeds model.max_position_embeddings "
                            f"{m.max_position_embeddings}: learned absolute positions have no "
                            "embedding past it and cannot extrapolate")
    if data is None:
        if len(model.cfg.data.train) != 1:
            raise EvalError("--data: the checkpoint was trained on a blend of datasets; name one prefix")
        data = model.cfg.data.train[0].path
    stream = held_out_tokens(data, model.cfg.data.split, "valid", max(max_tokens, max(lengths)))
    rows = []
    for n in lengths:
        loss, tokens = stream_loss(model, stream, n, batch_size)
        rows.append({"seq_length": n, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens,
                     "passkey": {f"{d:g}": passkey_accuracy(model, n, d, trials, batch_size=batch_size)
                                 for d in depths},
                     "trials": trials})
    return rows
