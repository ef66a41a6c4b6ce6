"""Training data through megatron-core: GPTDataset samples, blended by weight, split by documents.

A sample (`dataset[i]`) is a dict; with L = seq_length:
    tokens        int64 [L]   input ids
    labels        int64 [L]   the next token at every position (tokens shifted left by one)
    loss_mask     float32 [L] 1.0 where the loss counts (everywhere: eod is not masked)
    position_ids  int64 [L]   0 .. L-1 (not reset at document boundaries)
    dataset_id    int         which prefix of the blend it came from (blends of 2+ prefixes only)
No attention mask is built (megatron would make a dense 1 x L x L one per sample): megalong's
attention builds its own masks from positions. `collate` stacks samples into a batch. The `data`
keys document_mask, reset_position_ids and eod_mask_loss act on the batch once it is on its device
(megalong/train/documents.py), not here.

megatron-core loops forever when a split that is asked for samples receives no document (or no
token), so `build_gpt_datasets` checks every prefix's split first and names the problem.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from megalong.config import ConfigError
from megalong.data.index_cache import check_index_cache
from megalong.data.indexed import check_dataset
from megalong.data.splits import SPLIT_NAMES, parse_split

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _check_prefix_files(data_prefixes: Sequence[tuple[float, str]]) -> None:
    if not data_prefixes:
        raise ConfigError("data.train: no datasets given (list of .bin/.idx prefixes)")
    for i, (weight, prefix) in enumerate(data_prefixes):
        if not weight > 0:
            raise ConfigError(f"data.train[{i}].weight: expected a positive weight, got {weight} "
                              f"for {prefix}")
        check_dataset(str(prefix), f"data.train[{i}].path")


def split_sizes(prefix: str, split: str) -> list[tuple[int, int]]:
    """(documents, tokens) that each split of `prefix` receives, computed as megatron-core does."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the index is an mmap
    del dataset
    n = len(lengths)
    out = []
    for part in convert_split_vector_to_split_matrix(parse_split(split)):
        if part is None:
            out.append((0, 0))
            continue
        begin, end = int(round(part[0] * n)), int(round(part[1] * n))
        out.append((end - begin, int(lengths[begin:end].sum())))
    return out


def check_splits(data_prefixes: Sequence[tuple[float, str]], split: str,
                 num_samples: Sequence[int]) -> None:
    """Refuse, before megatron-core loops forever, a split asked for samples that gets no token."""
    _check_prefix_files(data_prefixes)
    parse_split(split)
    for weight, prefix in data_prefixes:
        sizes = split_sizes(prefix, split)
        total = sum(docs for docs, _ in sizes)
        for name, wanted, (docs, tokens) in zip(SPLIT_NAMES, num_samples, sizes):
            if wanted > 0 and tokens == 0:
                what = (f"{docs} of the {total} documents" if docs == 0
                        else f"{docs} empty documents (0 tokens)")
                raise ConfigError(
                    f"data.split: '{split}' gives the {name} split {what} of {prefix}, but {wanted} "
                    f"{name} samples are needed; give the {name} split a larger share or use more documents")


def _idx_digest(prefixes: Sequence[str]) -> str:
    """A digest of the .idx files: megatron's cache names ignore the data's content, so a prefix
    preprocessed again would otherwise reuse a stale sample index."""
    h = hashlib.sha1()
    for prefix in prefixes:
        with open(f"{prefix}.idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """megatron's BlendedDataset asks torch.distributed for the rank even in one plain process:
    give it a one-process gloo group (in-memory store, no network) for the build only."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_gpt_datasets(data_prefixes: Sequence[tuple[float, str]], split: str, seq_length: int, seed: int,
                       tokenizer, num_samples: Sequence[int], cache_dir: Optional[str | Path]):
    """(train, valid, test) megatron-core GPTDatasets (BlendedDataset for 2+ prefixes); None for
    a split asked for 0 samples. `data_prefixes` are (weight, .bin/.idx prefix) pairs; the sample
    index cache goes under `cache_dir` (None: built in memory, not cached); a cache there that
    megalong did not write is refused before megatron-core reads it (megalong/data/index_cache.py)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise ValueError(f"num_samples: expected (train, valid, test) counts >= 0, got {num_samples}")
    if seq_length < 1:
        raise ConfigError(f"data.seq_length: expected a positive length, got {seq_length}")
    num_samples = [int(n) for n in num_samples]
    check_splits(data_prefixes, split, num_samples)
    prefixes = [str(p) for _, p in data_prefixes]
    weights = [float(w) for w, _ in data_prefixes]
    cache = None if cache_dir is None else str(Path(cache_dir) / _idx_digest(prefixes))
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # Splits asked for no samples are not built at all; the others keep megatron's document
    # ranges (those come from the split string, not from this matrix).
    config.split_matrix = [part if n > 0 else None for part, n in zip(config.split_matrix, num_samples)]
    if cache is not None:
        check_index_cache(cache)  # megatron-core loads it with numpy.load(allow_pickle=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has checked before rank 0 writes into it
    with _process_group_for_megatron():
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()
    return tuple(ds if n > 0 else None for ds, n in zip(datasets, num_samples))


def blend_counts(dataset) -> list[tuple[str, float, int]]:
    """(prefix, normalised weight, samples it contributes) for every dataset of a split, counted
    from the BlendedDataset's own index (the exact numbers training will see)."""
    if dataset is None:
        return []
    if not hasattr(dataset, "dataset_index"):  # one prefix: a plain GPTDataset
        return [(str(dataset.dataset_path), 1.0, len(dataset))]
    index = np.asarray(dataset.dataset_index)[: len(dataset)]
    counts = np.bincount(index, minlength=len(dataset.datasets))
    total = sum(dataset.weights)
    return [(str(ds.dataset_path), w / total, int(n))
            for ds, w, n in zip(dataset.datasets, dataset.weights, counts)]


def describe_blend(name: str, dataset) -> str:
    """One line: how many samples of the split come from each dataset, and at what weight."""
    parts = [f"{Path(p).name} {100 * w:.1f}% -> {n} samples" for p, w, n in blend_counts(dataset)]
    total = sum(n for _, _, n in blend_counts(dataset))
    return f"data: {name} {total} samples: " + ", ".join(parts)


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: int64 tensors [B, L] (float32 for loss_mask), dataset_id [B]."""
    if not samples:
        raise ValueError("collate: no samples")
    batch = {}
    for key in samples[0]:
        values = [torch.as_tensor(np.asarray(s[key])) for s in samples]
        dtype = torch.float32 if key == "loss_mask" else torch.long
        batch[key] = torch.stack(values).to(dtype)
    return batch
