"""`megalong eval CHECKPOINT --seq-length N`: held-out perplexity of a checkpoint at any length.

The held-out documents (the split the training run evaluated on, as megatron-core cuts it) are
joined, in order and with their end-of-document tokens, into one token stream; its first
`max_tokens` tokens are cut into non-overlapping windows of N and every token after the first of
a window is scored. The same tokens are scored at every N, so perplexities at different lengths
compare directly (the ALiBi paper's evaluation, without its sliding window). N may exceed the
training length: that is how length extrapolation is measured. Learned absolute positions have no
embedding past `model.max_position_embeddings` and are refused there. A checkpoint trained with
`data.document_mask` (and `reset_position_ids`) is evaluated the same way: no token of a window
attends to another document (the same tokens are scored either way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from megalong.data.splits import SPLIT_NAMES, parse_split
from megalong.data.indexed import check_dataset
from megalong.errors import MegalongError
from megalong.train.documents import DocumentBatching, model_inputs


class EvalError(MegalongError):
    """An evaluation that cannot be run as asked (the message names the argument)."""

    kind = "eval"


@dataclass
class EvalResult:
    seq_length: int
    loss: float  # mean cross-entropy in nats per scored token
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def held_out_tokens(prefix: str, split: str, split_name: str = "valid",
                    max_tokens: Optional[int] = None) -> np.ndarray:
    """The documents of `split_name` in `prefix`'s .bin/.idx, concatenated in order (int64)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    part = convert_split_vector_to_split_matrix(parse_split(split))[SPLIT_NAMES.index(split_name)]
    if part is None:
        raise EvalError(f"--split: data.split '{split}' gives the {split_name} split no documents")
    check_dataset(prefix, "--data")
    dataset = IndexedDataset(prefix)
    begin, end = int(round(part[0] * len(dataset))), int(round(part[1] * len(dataset)))
    pieces, total = [], 0
    for i in range(begin, end):
        pieces.append(np.asarray(dataset[i], dtype=np.int64))
        total += len(pieces[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: np.ndarray, seq_length: int,
               batch_size: int = 4, documents: Optional[DocumentBatching] = None) -> EvalResult:
    """Mean loss of megatron `model` over `stream` cut into non-overlapping windows of seq_length;
    `documents`: segment ids and reset positions as in training (the loss mask is not used)."""
    windows = len(stream) // seq_length
    if windows == 0:
        raise EvalError(f"--seq-length: {seq_length} is longer than the {len(stream)} held-out tokens")
    tokens = torch.from_numpy(stream[:windows * seq_length].copy()).view(windows, seq_length)
    positions = torch.arange(seq_length).expand(batch_size, seq_length)
    total, count = 0.0, 0
    model.eval()
    for start in range(0, windows, batch_size):
        batch = tokens[start:start + batch_size]
        if documents is None:
            logits = model(batch, positions[:len(batch)], None).float()
        else:
            inputs = documents.apply({"tokens": batch, "loss_mask": torch.ones(batch.shape)})
            ids, batch_positions, kwargs = model_inputs(inputs)
            logits = model(ids, batch_positions, None, **kwargs).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return EvalResult(seq_length, total / count, count)


def evaluate_checkpoint(checkpoint: str | Path, seq_lengths: list[int], max_tokens: int = 32768,
                        data_prefix: Optional[str] = None, split_name: str = "valid",
                        batch_size: int = 4) -> list[EvalResult]:
    """Perplexity of a checkpoint (TP shards merged, one process) at each of `seq_lengths`, on the
    same first `max_tokens` held-out tokens of its training data (or of `data_prefix`)."""
    from megalong.generate import load_for_inference
    from megalong.parallel.distributed import shutdown

    try:
        model, cfg, tokenizer = load_for_inference(checkpoint)
        documents = DocumentBatching.from_config(cfg.data, tokenizer.eod)
        if documents is not None:
            documents = DocumentBatching(documents.eod, documents.document_mask, documents.reset_position_ids)
        m = cfg.model
        for n in seq_lengths:
            if n < 2:
                raise EvalError(f"--seq-length: expected at least 2 tokens, got {n}")
            if m.position_embedding == "learned" and n > m.max_position_embeddings:
                raise EvalError(f"--seq-length: {n} exceeds model.max_position_embeddings "
                                f"{m.max_position_embeddings}: learned absolute positions have no "
                                "embedding past it and cannot extrapolate")
        if data_prefix is None:
            if len(cfg.data.train) != 1:
                raise EvalError("--data: the checkpoint was trained on a blend of datasets; name one prefix")
            data_prefix = cfg.data.train[0].path
        stream = held_out_tokens(data_prefix, cfg.data.split, split_name, max_tokens)
        return [perplexity(model, stream, n, batch_size, documents) for n in seq_lengths]
    finally:
        shutdown()
