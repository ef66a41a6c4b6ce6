"""Training data through megatron-core: GPTDataset samples, blended by weight, split by documents.

Each sample is a dict of torch tensors of length seq_length:
    tokens      input ids
    labels      tokens shifted by one (the next token at every position)
    loss_mask   1.0 where the loss counts
    position_ids
No attention mask is built (megatron would make a dense L x L one per sample): megalong's attention
builds its own masks from positions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix, parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megalong.config import ConfigError

SPLIT_NAMES = ("train", "valid", "test")


def documents_per_split(prefix: str, split: str) -> list[int]:
    """How many documents of `prefix` each split receives, computed as megatron-core does."""
    n = GPTDataset.numel_low_level_dataset(IndexedDataset(prefix))
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [0 if part is None else int(round(part[1] * n)) - int(round(part[0] * n)) for part in matrix]


def check_splits(data_prefixes: list[tuple[float, str]], split: str,
                 num_samples: tuple[int, int, int]) -> None:
    """A split asked for samples but given no document makes megatron loop forever; refuse it."""
    for weight, prefix in data_prefixes:
        for prefix_file in (f"{prefix}.bin", f"{prefix}.idx"):
            if not Path(prefix_file).is_file():
                raise ConfigError(f"data.train: {prefix_file} not found")
        counts = documents_per_split(prefix, split)
        for name, wanted, docs in zip(SPLIT_NAMES, num_samples, counts):
            if wanted > 0 and docs == 0:
                raise ConfigError(
                    f"data.split: '{split}' gives the {name} split 0 of the "
                    f"{sum(counts)} documents of {prefix}, but {wanted} {name} samples are needed; "
                    f"use more documents or a larger {name} share")


def build_gpt_datasets(data_prefixes: list[tuple[float, str]], split: str, seq_length: int, seed: int,
                       tokenizer, num_samples: tuple[int, int, int], cache_dir: Optional[str]):
    """(train, valid, test) megatron GPTDatasets (None where no samples are asked for)."""
    check_splits(data_prefixes, split, num_samples)
    weights = [w for w, _ in data_prefixes]
    prefixes = [p for _, p in data_prefixes]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # megatron wants every split sized when blend weights are given; None skips a split otherwise.
    sizes = list(num_samples) if len(prefixes) > 1 else [n if n > 0 else None for n in num_samples]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
