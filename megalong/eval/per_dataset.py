"""Held-out loss per dataset of data.train: `valid/<name>/loss` and `valid/<name>/ppl`.

megatron-core's own multiple validation sets (`multiple_validation_sets`) exist only for blends
given per split (`blend_per_split`); megalong blends one distribution and splits each prefix by
documents (`blend` + `split`). So each prefix's held-out split is built as its own megatron-core
GPTDataset, from the same documents the blend's held-out split takes from it, and evaluated on the
same number of samples as the blended held-out loss (train.eval_iters global batches)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megalong.config import Config


def dataset_names(cfg: Config) -> list[str]:
    """Each data.train entry's name: its `name`, else its prefix's file name (made unique)."""
    names: list[str] = []
    for i, entry in enumerate(cfg.data.train):
        name = entry.name or Path(entry.path).name
        names.append(name if name not in names else f"{name}_{i}")
    return names


def valid_sets(cfg: Config, tokenizer: Any, samples: int, cached: bool = True) -> dict[str, Any]:
    """{name: the held-out GPTDataset of that prefix alone} of `samples` samples each (its
    index cached with the run's, or built in memory)."""
    from megalong.data.datasets import build_gpt_datasets
    from megalong.data.index_cache import index_cache_root

    out = {}
    for name, entry in zip(dataset_names(cfg), cfg.data.train):
        _, valid, _ = build_gpt_datasets([(1.0, entry.path)], cfg.data.split, cfg.seq_length, cfg.train.seed,
                                         tokenizer, (0, samples, 0), index_cache_root(cfg) if cached else None)
        out[name] = valid
    return out


@torch.no_grad()
def model_loss(model: Any, dataset: Any, samples: int, batch_size: int) -> float:
    """Mean next-token loss of an EvalModel (megalong/eval/model.py) over the first `samples`
    samples of `dataset` (labels, loss mask and document segments as the training loss takes them)."""
    from megalong.train.batches import fetch

    total, count = 0.0, 0
    for start in range(0, samples, batch_size):
        batch = fetch(dataset, list(range(start, min(samples, start + batch_size))), torch.device("cpu"),
                      model.batching)  # the loss mask of data.eod_mask_loss
        scores = model.score(batch["tokens"], batch["labels"], packed=True)
        mask = batch["loss_mask"]
        total += float(-(scores.logprob.double() * mask).sum())
        count += int(mask.sum())
    return total / max(1, count)


def checkpoint_losses(model: Any, max_tokens: int, batch_size: int) -> dict[str, float]:
    """`megalong eval --per-dataset`: per data.train dataset of the checkpoint's config, the
    loss over its first held-out samples (at most `max_tokens` tokens, at least one sample)."""
    cfg = model.cfg
    samples = max(1, max_tokens // cfg.seq_length)
    sets = valid_sets(cfg, model.tokenizer, samples, cached=False)
    return {name: model_loss(model, dataset, samples, batch_size) for name, dataset in sets.items()}
