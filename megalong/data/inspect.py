"""What `megalong data inspect PREFIX` reports of a .bin/.idx dataset (`megalong data merge` is
megalong/data/indexed.py's `merge`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from megalong.data.indexed import expand_prefixes, read_index


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, documents) per power-of-two bucket of document lengths [low, high)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    buckets = np.zeros(len(lengths), dtype=np.int64)
    nonzero = lengths > 0
    buckets[nonzero] = np.floor(np.log2(lengths[nonzero])).astype(np.int64) + 1
    counts = np.bincount(buckets)
    return [(0 if b == 0 else 2 ** (b - 1), 1 if b == 0 else 2 ** b, int(n))
            for b, n in enumerate(counts) if n]


def _tokenizer_of(prefix: str) -> Optional[str]:
    """The tokenizer recorded by preprocess in <shard>.done.json, if it is still there."""
    for candidate in (Path(f"{prefix}.done.json"), *Path(prefix).parent.glob("*.done.json")):
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if os.path.abspath(prefix) in map(os.path.abspath, record.get("outputs", {})):
            path = record["settings"]["tokenizer"]
            return path if Path(path).is_file() else None
    return None


def inspect_dataset(prefix: str, tokenizer_model: Optional[str] = None, samples: int = 1,
                    sample_tokens: int = 200) -> str:
    """A report: documents, tokens, dtype, length statistics and histogram, decoded samples."""
    from megalong.data.tokenizer import load_tokenizer

    [prefix] = expand_prefixes([prefix])
    dtype, lengths, doc_idx = read_index(f"{prefix}.idx")
    lengths = np.array(lengths, dtype=np.int64)
    docs = len(doc_idx) - 1
    lines = [f"{prefix}: {docs} documents, {len(lengths)} sequences, {int(lengths.sum())} tokens, "
             f"dtype {dtype.name}, {os.path.getsize(prefix + '.bin') / 1e6:.1f} MB"]
    if len(lengths):
        lines.append(f"tokens per document: min {lengths.min()}, mean {lengths.mean():.1f}, "
                     f"median {int(np.median(lengths))}, max {lengths.max()}")
        lines.append("length histogram (tokens: documents):")
        width = max(n for _, _, n in length_histogram(lengths))
        for low, high, n in length_histogram(lengths):
            lines.append(f"  [{low:>8}, {high:>8}) {n:>10}  {'#' * max(1, round(40 * n / width))}")
    tokenizer_model = tokenizer_model or _tokenizer_of(prefix)
    if samples and len(lengths):
        data = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
        tokenizer = load_tokenizer(tokenizer_model) if tokenizer_model else None
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i in np.linspace(0, len(lengths) - 1, min(samples, len(lengths))).astype(int):
            ids = data[offsets[i]: offsets[i] + min(lengths[i], sample_tokens)].tolist()
            shown = repr(tokenizer.decode(ids)) if tokenizer is not None else str(ids)
            more = " ..." if lengths[i] > sample_tokens else ""
            lines.append(f"document {i} ({lengths[i]} tokens): {shown}{more}")
        if tokenizer is None:
            lines.append("(token ids shown: give --tokenizer-model to decode them)")
        del data
    return "\n".join(lines)
