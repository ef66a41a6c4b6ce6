"""Which samples each process reads at each step: a pure function of the step, so that a resumed
run reads exactly what the uninterrupted run would have read."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from megalong.parallel.context import split_batch
from megalong.train.documents import DocumentBatching


def micro_batch_indices(step: int, global_batch: int, micro_batch: int, dp_size: int,
                        dp_rank: int) -> list[list[int]]:
    """Dataset indices of this data-parallel rank's micro-batches for optimizer step `step`.

    Global batch `step` is samples [step * global_batch, (step + 1) * global_batch); rank r takes
    the r-th contiguous share, cut into micro-batches in order.
    """
    per_rank = global_batch // dp_size
    start = step * global_batch + dp_rank * per_rank
    return [list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)]


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def fetch(dataset, indices: list[int], device: torch.device,
          documents: Optional[DocumentBatching] = None) -> dict[str, torch.Tensor]:
    """The samples at `indices` as a batch on `device`; `documents`: with segment ids, reset
    positions and the EOD loss mask computed there (data.document_mask and friends); with
    `parallel.context`, this rank's chunk of each sequence (computed on the whole sequence first)."""
    batch = collate([dataset[i] for i in indices])
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return split_batch(batch if documents is None else documents.apply(batch))


def eval_batches(dataset, eval_iters: int, global_batch: int, micro_batch: int, dp_size: int,
                 dp_rank: int) -> Iterator[list[int]]:
    """The same held-out samples at every evaluation: the first eval_iters global batches."""
    for step in range(eval_iters):
        yield from micro_batch_indices(step, global_batch, micro_batch, dp_size, dp_rank)
