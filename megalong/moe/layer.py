"""MoELayer: megatron's MLP slot filled with a router, a dispatcher and experts.

forward(hidden [s, b, h]) -> (output [s, b, h], None), like megatron's MLP. The auxiliary loss of
the last forward is kept on the layer (`aux_loss`) for the training step to add to the LM loss,
and its routing statistics (`stats`) for the logs.

megatron's full recompute runs a layer's first forward without autograd and again in backward: the
aux loss the step adds then has no graph. `moe_aux_loss(model, grad_scale)` marks such layers, and
their recomputation gives its aux loss the gradient the step's sum would have (AttachAuxLoss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from megalong.kernels import select as kernels
from megalong.moe.dispatch import permute, plan, unpermute
from megalong.moe.expert_parallel import all_to_all, gather_rows, plan_exchange, slice_rows
from megalong.moe.experts import Experts
from megalong.moe.options import MoEOptions
from megalong.moe.router import NoisyTopKRouter, TopKRouter, build_router, chunk_noise
from megalong.parallel.context import context_size


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `output` whose backward also gives `aux_loss` the gradient `scale`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


@dataclass
class RoutingStats:
    load: torch.Tensor  # [E] assignments per expert (before capacity)
    dropped: torch.Tensor  # assignments dropped by capacity
    assignments: int


class MoELayer(nn.Module):
    def __init__(self, config: Any, options: MoEOptions | dict | None = None,
                 ffn_hidden_size: Optional[int] = None, **unused: Any):
        """`options`: the config's typed model.moe (or, built by hand, its fields as a dict)."""
        super().__init__()
        self.options = options if isinstance(options, MoEOptions) else MoEOptions(**(options or {}))
        o = self.options
        hidden = config.hidden_size
        ffn = o.expert_hidden_size or ffn_hidden_size or config.ffn_hidden_size
        gated = bool(config.gated_linear_unit)
        output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        self.ep_size, ep_rank, self.ep_group = expert_parallel_layout()
        self.tp_size, self.tp_rank, self.tp_group = 1, 0, None
        if self.ep_size > 1:
            from megatron.core import parallel_state

            self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
            self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        if o.num_experts % self.ep_size:
            raise ValueError(f"model.moe.num_experts: {o.num_experts} experts do not divide over "
                             f"parallel.expert={self.ep_size} ranks")
        local = o.num_experts // self.ep_size
        self.router = build_router(hidden, o)
        self.experts = Experts(o.num_experts, hidden, ffn, config.activation_func, gated,
                               config.init_method_std, output_std, first=ep_rank * local, count=local)
        for param in self.experts.parameters():
            param.expert_parallel = True  # reduced over the expert-data-parallel group, not DP
        self.shared = (Experts(1, hidden, ffn * o.num_shared_experts, config.activation_func, gated,
                               config.init_method_std, output_std) if o.num_shared_experts else None)
        self.aux_loss: Optional[torch.Tensor] = None
        self.ran_without_autograd = False  # the last forward: training, autograd off (a checkpoint)
        self.recompute_aux_scale: Optional[float] = None  # set by moe_aux_loss: its forwards are recomputed
        self.stats: Optional[RoutingStats] = None
        self.layer_number: Optional[int] = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask: Any = None, **unused: Any):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        fused = kernels.use_kernels(x)  # Triton gating, permutation and grouped GEMM on CUDA
        if type(self.router) is TopKRouter:
            routing = self.router(x, fused=fused)
        elif isinstance(self.router, NoisyTopKRouter) and self.training and context_size() > 1:
            # the noise one process draws for the whole sequence, this chunk's rows
            routing = self.router(x, noise=chunk_noise(shape, self.options.num_experts, self.router.dtype, x.device))
        else:
            routing = self.router(x)
        dispatch = plan(routing.expert_index, routing.gates, routing.kept, self.options.num_experts)
        if fused and self.ep_size == 1:
            out = fused_experts(self.experts, x, dispatch, routing.expert_index.shape[1])
        else:
            out = self._experts_torch(x, dispatch)
        if self.shared is not None:
            out = out + self.shared.expert(0, x)
        self.aux_loss = routing.aux_loss
        self.ran_without_autograd = self.training and not torch.is_grad_enabled()
        # The mark stays: a pipeline schedule runs several micro-batches' forwards before their
        # backwards, and every training forward of a checkpointed layer is recomputed.
        if self.training and torch.is_grad_enabled() and self.recompute_aux_scale is not None:
            out = AttachAuxLoss.apply(out, routing.aux_loss, self.recompute_aux_scale)
        self.stats = RoutingStats(routing.load.detach(), (~routing.kept).sum().detach(), routing.kept.numel())
        return out.view(shape), None

    def _experts_torch(self, x: torch.Tensor, dispatch: Any) -> torch.Tensor:
        rows = permute(x, dispatch)
        if self.ep_size == 1:
            y = self.experts(rows, dispatch.tokens_per_expert)
        elif self.tp_size == 1:
            y = self._experts_across_ranks(rows, dispatch.tokens_per_expert)
        else:
            # Routing (and the combine below) is replicated on the TP ranks; the expert work is not:
            # each TP rank sends the assignments of its slice of the tokens.
            owner = dispatch.token * self.tp_size // x.shape[0]
            mine = owner == self.tp_rank
            counts = torch.bincount(dispatch.expert[mine], minlength=self.options.num_experts)
            mine_rows = slice_rows(rows, owner, self.tp_rank, self.tp_size, self.tp_group)
            y = gather_rows(self._experts_across_ranks(mine_rows, counts), owner, self.tp_rank,
                            self.tp_size, self.tp_group)
        return unpermute(y, dispatch, x.shape[0])

    def _experts_across_ranks(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert -> their experts' ranks -> back, in the same order."""
        ex = plan_exchange(tokens_per_expert, self.ep_size, self.ep_group)
        received = all_to_all(rows, ex.send, ex.recv, self.ep_group)
        y = self.experts(received[ex.order], ex.local_counts)
        y = torch.empty_like(y).index_copy(0, ex.order, y)  # back to the order rows arrived in
        return all_to_all(y, ex.recv, ex.send, self.ep_group)


@kernels.eager
def fused_experts(experts: Experts, x: torch.Tensor, dispatch: Any, top_k: int) -> torch.Tensor:
    """`MoELayer._experts_torch` on one expert-parallel rank, on the kernels (megalong/kernels/moe.py,
    grouped_gemm.py): permute, the experts as grouped GEMMs, combine with the gates: what
    `unpermute(experts(permute(x, d), d.tokens_per_expert), d, T)` computes (top_k: the most experts
    a token goes to)."""
    from megalong.kernels.grouped_gemm import grouped_experts
    from megalong.kernels.moe import combine_rows, permute_rows, rows_of_tokens

    rows = rows_of_tokens(dispatch.token, x.shape[0], top_k)
    y = permute_rows(x, dispatch.token, rows)
    y = grouped_experts(y, dispatch.tokens_per_expert, experts.w1, experts.w2,
                        getattr(experts, "w3", None) if experts.gated else None, experts.activation)
    return combine_rows(y, dispatch.gate, dispatch.token, rows)


def expert_parallel_layout() -> tuple[int, int, Any]:
    """(size, rank, group) of megatron-core's expert-model-parallel group; (1, 0, None) without one."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None
    size = parallel_state.get_expert_model_parallel_world_size()
    if size == 1:
        return 1, 0, None
    return size, parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_group()


def moe_aux_loss(model: nn.Module, grad_scale: Optional[float] = None) -> Optional[torch.Tensor]:
    """Sum of the auxiliary losses of every MoE layer's last forward (None without MoE layers).
    `grad_scale`: the factor this sum enters the step's loss with, given to the aux loss of layers
    whose forward ran without autograd when their recomputation in backward runs."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    if grad_scale is not None:
        for m in layers:
            if m.ran_without_autograd:
                m.recompute_aux_scale = grad_scale
    losses = [m.aux_loss for m in layers]
    return torch.stack([l.float() for l in losses]).sum() if losses else None


def update_router_biases(model: nn.Module, applied=None) -> None:
    """Aux-loss-free balancing: move every router's expert bias after an optimizer step.
    `applied` (a 0-dim tensor, 0.0 for a step whose update was dropped) scales the move."""
    from megatron.core import parallel_state

    from megalong.parallel.distributed import data_context_group, data_context_size

    group = None  # data x context ranks: at context parallelism each holds one chunk of its sequences
    if parallel_state.model_parallel_is_initialized() and data_context_size() > 1:
        group = data_context_group()
    for m in model.modules():
        if isinstance(m, MoELayer) and m.options.bias_update_rate and hasattr(m.router, "update_bias"):
            m.router.update_bias(group, applied)


def moe_stats(model: nn.Module) -> list[tuple[int, RoutingStats]]:
    return [(m.layer_number, m.stats) for m in model.modules() if isinstance(m, MoELayer) and m.stats]
