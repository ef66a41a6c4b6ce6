"""The names checkpoints store entries under, in one place: every entry is named as the
one-process model names it (global layer numbers), whatever the layout that wrote it.

Torch-free at import (megalong/model/gpt.py is imported only when a chunk is renamed)."""
from __future__ import annotations

from typing import Any, Iterable

TIED_EMBEDDING = "embedding.word_embeddings.weight"  # also the tied output layer's weights
OUTPUT_LAYER = "output_layer.weight"
OPTIM_SEP = "/"  # megalong's format names optimizer entries "<parameter name>/<state key>"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def tied_source(name: str, tied: bool) -> str:
    """The stored entry a weight is read from: the last pipeline stage's copy of a tied embedding
    (its output layer) reads the embedding, which the one-process model holds once."""
    return TIED_EMBEDDING if tied and name == OUTPUT_LAYER else name


def is_expert_key(name: str) -> bool:
    """State-dict keys of expert weights (split over expert-parallel ranks along dim 0)."""
    return ".mlp.experts.w" in name


def chunks_of(model: Any) -> list:
    """A rank's model chunks: one module, or the list of its virtual pipeline stages."""
    if isinstance(model, (list, tuple)):
        return list(model)
    import torch

    if isinstance(model, torch.nn.ModuleList):
        return list(model)
    return [model]


def pipeline_layer_offset(chunk: Any) -> int:
    """The global number of a model chunk's first decoder layer (0 without pipeline stages)."""
    from megalong.model.gpt import layer_offset

    return layer_offset(chunk) if chunk.config.pipeline_model_parallel_size > 1 else 0


def global_names(chunk: Any, local_names: Iterable[str]) -> list[str]:
    """A chunk's state-dict keys under the whole model's layer numbers."""
    from megalong.model.gpt import to_global_names

    return list(to_global_names(dict.fromkeys(local_names), pipeline_layer_offset(chunk)))
