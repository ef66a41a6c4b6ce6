"""Sizes derived from the config and the parallel layout: pipeline stage split, padded vocabulary."""
from __future__ import annotations

import math

from megalong.config.schema import Config


def pipeline_split(cfg: Config) -> list[int]:
    """Number of layers of every pipeline stage (all virtual chunks of a rank together)."""
    p, n = cfg.parallel, cfg.model.num_layers
    if p.pipeline == 1:
        return [n]
    first, last = p.pipeline_layers if p.pipeline_layers is not None else (None, None)
    if first is None or last is None:
        return [n // p.pipeline] * p.pipeline
    middle = (n - first - last) // (p.pipeline - 2) if p.pipeline > 2 else 0
    return [first] + [middle] * (p.pipeline - 2) + [last]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocabulary padded so that every tensor-parallel rank holds an equal slice.

    The multiple does not depend on the TP size when it already divides `divisible_by`, so that
    TP=1 and TP=2 runs of one config have identical embeddings.
    """
    multiple = divisible_by * tensor_parallel // math.gcd(divisible_by, tensor_parallel)
    return -(-vocab_size // multiple) * multiple
