"""AdamW with the usual decay groups, and gradient norm/clipping that is correct under TP."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megalong.config import TrainConfig


def no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Biases, norms and position embeddings get no weight decay (as in Megatron-LM)."""
    return param.ndim < 2 or "position_embeddings" in name


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the `no_weight_decay` exceptions. Fused on CUDA, and everywhere with
    train.nonfinite: skip (its `found_inf` drops a step's update on the device)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(param, name) else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or t.nonfinite == "skip"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=fused or None)


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) ** 2


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of the whole (tensor- and expert-parallel) model.

    Parameters replicated on every TP rank (norms, row-parallel biases) are counted once; the
    squared norms of the sliced ones are summed over the tensor-parallel group, those of the
    experts over the expert-parallel group (each rank holds different experts), and both over the
    pipeline stages. The last stage's copy of tied embeddings (`shared`) is not counted twice.
    """
    device = params[0].device
    params = [p for p in params if p.grad is not None and not getattr(p, "shared", False)]
    expert = [p.grad for p in params if getattr(p, "expert_parallel", False)]
    dense = [p.grad for p in params if not getattr(p, "expert_parallel", False)
             and param_is_not_tensor_parallel_duplicate(p)]
    total = _squared_norm(dense, device)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    expert_total = _squared_norm(expert, device)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(expert_total, group=parallel_state.get_expert_model_parallel_group())
    total = total + expert_total
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total.sqrt()


def reduce_tied_embedding_gradients(chunks: list[torch.nn.Module]) -> None:
    """With pipeline stages, tied input and output embeddings live on the first and the last
    stage: sum their gradients over megatron's embedding group, so both copies take the same step
    (the gradient the one shared weight has in a single process)."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if (parallel_state.get_pipeline_model_parallel_world_size() == 1
            or not (first or parallel_state.is_pipeline_last_stage(ignore_virtual=True))):
        return
    group = parallel_state.get_embedding_group()
    if dist.get_world_size(group) == 1:
        return
    chunk = chunks[0] if first else chunks[-1]
    if not getattr(chunk, "share_embeddings_and_output_weights", False):
        return
    weight = chunk.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=group)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0 disables) and return the norm before clipping."""
    norm = grad_norm(params)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
