"""AdamW with the usual decay groups, and gradient norm/clipping that is correct under TP."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megalong.config import TrainConfig


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms and position embeddings get no weight decay (as in Megatron-LM)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "position_embeddings" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=fused or None)


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of the whole (tensor-parallel) model.

    Parameters replicated on every TP rank (norms, row-parallel biases) are counted once; the
    squared norms of the sliced ones are summed over the model-parallel group.
    """
    grads = [p.grad for p in params if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    device = params[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) ** 2
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0 disables) and return the norm before clipping."""
    norm = grad_norm(params)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
