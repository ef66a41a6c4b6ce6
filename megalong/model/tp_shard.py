"""Merge per-rank tensor-parallel state dicts into one, and split one into per-rank slices.

Which dimension a tensor is split along is recorded from the live model's parameter attributes
(megatron sets `tensor_model_parallel` and `partition_dim`), never guessed from names. Gated MLPs
(SwiGLU) keep [gate; up] per rank, so their fc1 is merged half by half.
"""
from __future__ import annotations

import torch


def partition_dims(model: torch.nn.Module) -> dict[str, int | None]:
    """name -> the dimension it is split along across TP ranks (None: replicated)."""
    dims = {}
    for name, param in model.named_parameters():
        split = getattr(param, "tensor_model_parallel", False)
        dims[name] = int(param.partition_dim) if split else None
    return dims


def _is_gated_fc1(name: str, gated: bool) -> bool:
    return gated and "linear_fc1" in name


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], dims: dict[str, int | None],
                          gated_mlp: bool = False) -> dict[str, torch.Tensor]:
    """One state dict equal to the TP=1 model's, from the TP ranks' state dicts in rank order."""
    merged = {}
    for name, first in shards[0].items():
        dim = dims.get(name)
        if dim is None or len(shards) == 1:
            merged[name] = first
        elif _is_gated_fc1(name, gated_mlp):
            halves = [s[name].chunk(2, dim=dim) for s in shards]
            merged[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
        else:
            merged[name] = torch.cat([s[name] for s in shards], dim=dim)
    return merged


def split_tensor_parallel(full: dict[str, torch.Tensor], dims: dict[str, int | None], size: int,
                          rank: int, gated_mlp: bool = False) -> dict[str, torch.Tensor]:
    """This rank's slice of a TP=1 state dict (inverse of merge_tensor_parallel)."""
    out = {}
    for name, tensor in full.items():
        dim = dims.get(name)
        if dim is None or size == 1:
            out[name] = tensor
        elif _is_gated_fc1(name, gated_mlp):
            gate, up = tensor.chunk(2, dim=dim)
            out[name] = torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
        else:
            out[name] = tensor.chunk(size, dim=dim)[rank].clone()
    return out
