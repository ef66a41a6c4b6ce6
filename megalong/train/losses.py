"""The training objective and what every engine does with it alike: the masked mean of the
per-token cross-entropy, autocast under `execution.precision: bf16`, the mean over data-parallel ranks,
and the held-out forward without pipeline stages."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.config import Config
from megalong.parallel.context import context_loss, context_size
from megalong.train.documents import model_inputs


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token.dtype)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def lm_loss(model: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens the loss mask keeps."""
    tokens, positions, kwargs = model_inputs(batch)
    per_token = model(tokens, positions, None, labels=batch["labels"], **kwargs)
    if context_size() > 1:  # this rank holds one chunk of every sequence: the mean over all of them
        return context_loss(per_token, batch["loss_mask"])
    return masked_mean(per_token, batch["loss_mask"])


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.execution.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mean_over_data_parallel(value: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    return value


@torch.no_grad()
def held_out_loss(model: Callable, batches: Iterable[dict[str, torch.Tensor]], cfg: Config,
                  device: torch.device) -> torch.Tensor:
    """The mean LM loss over `batches` on this rank, one forward each."""
    losses = []
    for batch in batches:
        with autocast(cfg, device):
            losses.append(lm_loss(model, batch))
    return torch.stack(losses).mean()
