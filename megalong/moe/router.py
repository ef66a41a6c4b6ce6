"""Routers: which experts each token goes to, with what weight, and the auxiliary loss."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalong.kernels import select as kernels
from megalong.kernels.gating_reference import Gating, reference_topk_gating
from megalong.moe.losses import cv_squared, load_balance_loss, router_z_loss
from megalong.moe.options import MoEOptions
from megalong.parallel.context import context_rank, context_size, context_sum, rank_positions


@dataclass
class Routing:
    expert_index: torch.Tensor  # [T, k] chosen experts per token, best first
    gates: torch.Tensor  # [T, k] combine weights
    kept: torch.Tensor  # [T, k] False where the expert was over capacity (token passes residual only)
    aux_loss: torch.Tensor  # weighted auxiliary loss (balance + z-loss)
    load: torch.Tensor  # [E] assignments per expert before capacity


def in_router_dtype(forward):
    """Run a router's forward with autocast off, so that it computes in its `router_dtype` (fp32 or
    fp64) also under `execution.precision: bf16`: autocast would otherwise run its `F.linear` (the
    logits) in bf16 whatever the dtype its inputs were cast to."""

    @functools.wraps(forward)
    def run(self, x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x, *args, **kwargs)

    return run


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: Optional[float]) -> Optional[int]:
    if factor is None:
        return None
    return math.ceil(tokens * top_k / num_experts * factor)


def apply_capacity(expert_index: torch.Tensor, num_experts: int, capacity: Optional[int]) -> torch.Tensor:
    """kept[t, j]: whether token t's j-th choice fits in its expert. First choices of all tokens
    take places before second choices (GShard); within a rank, earlier tokens come first."""
    if capacity is None:
        return torch.ones_like(expert_index, dtype=torch.bool)
    T, k = expert_index.shape
    by_rank = expert_index.t().reshape(-1)  # rank-major order: all first choices, then second ...
    one_hot = F.one_hot(by_rank, num_experts)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, by_rank.unsqueeze(1)).squeeze(1)
    return (position < capacity).view(k, T).t()


@kernels.eager
def gating_kernel(logits: torch.Tensor, k: int, renormalize: bool, selection_bias: Optional[torch.Tensor]) -> Gating:
    """`reference_topk_gating` on the fused gating kernel (megalong/kernels/moe.py), float32 logits."""
    from megalong.kernels.moe import topk_gating as fused_topk_gating

    bias = None if selection_bias is None else selection_bias.to(logits.dtype)
    return fused_topk_gating(logits, k, renormalize, bias)


class TopKRouter(nn.Module):
    """GShard/Mixtral top-k (k >= 1, weights renormalised over the chosen) or Switch top-1 (the
    gate is the router probability itself). Load-balance loss of Switch, optional z-loss."""

    def __init__(self, hidden_size: int, options: MoEOptions):
        super().__init__()
        self.options = options
        self.top_k = 1 if options.router == "switch" else options.top_k
        self.renormalize = options.router == "topk" and self.top_k > 1
        self.dtype = torch.float64 if options.router_dtype == "fp64" else torch.float32
        self.weight = nn.Parameter(torch.empty(options.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        # Aux-loss-free balancing: the bias steers which experts are chosen, never the gates.
        self.register_buffer("expert_bias", torch.zeros(options.num_experts, dtype=torch.float64))
        # Loads of this rank's tokens since the last update: a plain attribute, not a buffer, as
        # DDP overwrites every buffer with rank 0's at each forward.
        self.step_load: Optional[torch.Tensor] = None

    @in_router_dtype
    def forward(self, x: torch.Tensor, fused: bool = False) -> Routing:
        """`fused`: the top-k gating on the Triton kernel (the MoE layer asks `kernels.use_kernels`);
        a float64 router (`router_dtype: fp64`) keeps the torch gating."""
        o = self.options
        logits = F.linear(x.to(self.dtype), self.weight.to(self.dtype))
        bias = self.expert_bias if o.bias_update_rate else None
        gating = gating_kernel if fused and self.dtype == torch.float32 else reference_topk_gating
        g = gating(logits, self.top_k, self.renormalize, bias)
        probs, gates, expert_index, load = g.probs, g.gates, g.expert_index, g.counts
        if o.bias_update_rate and self.training:
            counts = load.double()
            self.step_load = counts if self.step_load is None else self.step_load + counts
        capacity = None if o.dropless else expert_capacity(x.shape[0], self.top_k, o.num_experts, o.capacity_factor)
        # Both losses are of the whole sequence: at context parallelism, sums over its chunks.
        aux = o.aux_loss_coeff * load_balance_loss(probs, expert_index, o.num_experts, counts=load, total=context_sum)
        if o.z_loss_coeff:
            aux = aux + o.z_loss_coeff * router_z_loss(logits, total=context_sum)
        return Routing(expert_index, gates.to(x.dtype), apply_capacity(expert_index, o.num_experts, capacity),
                       aux, load)

    @torch.no_grad()
    def update_bias(self, data_parallel_group=None, applied=None) -> None:
        """After an optimizer step: b_i += rate * sign(mean load - load_i), with the loads of the
        step summed over the data-parallel group (data x context ranks at context parallelism: the
        loads of whole sequences) so that every replica moves the same way;
        times `applied` (0.0: the step's update was dropped, the bias stays) when given."""
        load = self.step_load if self.step_load is not None else torch.zeros_like(self.expert_bias)
        if data_parallel_group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=data_parallel_group)
        move = self.options.bias_update_rate * torch.sign(load.mean() - load)
        if applied is not None:
            move = move * applied.to(move.device, move.dtype)
        self.expert_bias += move
        self.step_load = None


class NoisyTopKRouter(nn.Module):
    """Shazeer et al. 2017: H = x W_g + N(0, 1) * softplus(x W_noise) (noise only in training),
    softmax over the top-k of H. Losses: importance CV^2(sum of gates) and the smooth load
    CV^2(sum over tokens of P(x, i)), P the normal-CDF probability that expert i stays in the
    top-k under fresh noise."""

    def __init__(self, hidden_size: int, options: MoEOptions):
        super().__init__()
        self.options = options
        self.top_k = options.top_k
        self.dtype = torch.float64 if options.router_dtype == "fp64" else torch.float32
        self.w_gate = nn.Parameter(torch.zeros(options.num_experts, hidden_size))  # zero init, as in the paper
        self.w_noise = nn.Parameter(torch.zeros(options.num_experts, hidden_size))

    @in_router_dtype
    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Routing:
        o, k = self.options, self.top_k
        x = x.to(self.dtype)
        clean = F.linear(x, self.w_gate.to(self.dtype))
        noise_std = F.softplus(F.linear(x, self.w_noise.to(self.dtype))) + 1e-2
        if self.training:
            if noise is None:
                noise = torch.randn_like(clean)
            noisy = clean + noise.to(self.dtype) * noise_std
        else:
            noisy = clean
        kept_values, expert_index = noisy.topk(min(k + 1, o.num_experts), dim=-1)
        top_values, expert_index = kept_values[:, :k], expert_index[:, :k]
        gates = torch.softmax(top_values, dim=-1)

        importance = torch.zeros(x.shape[0], o.num_experts, dtype=self.dtype, device=x.device)
        importance = importance.scatter(1, expert_index, gates).sum(0)
        aux = cv_squared(context_sum(importance))  # of the whole sequence at context parallelism
        if self.training and k < o.num_experts:
            # P(x, i): probability that clean_i + noise beats the k-th best of the *other* experts:
            # the (k+1)-th value if i is in the top-k, else the k-th.
            threshold_in, threshold_out = kept_values[:, k:k + 1], kept_values[:, k - 1:k]
            is_in = noisy >= kept_values[:, k - 1:k]
            threshold = torch.where(is_in, threshold_in, threshold_out)
            normal = torch.distributions.Normal(torch.zeros((), dtype=self.dtype, device=x.device),
                                                torch.ones((), dtype=self.dtype, device=x.device))
            prob = normal.cdf((clean - threshold) / noise_std)
            aux = aux + cv_squared(context_sum(prob.sum(0)))
        aux = o.aux_loss_coeff * aux
        capacity = None if o.dropless else expert_capacity(x.shape[0], k, o.num_experts, o.capacity_factor)
        load = torch.bincount(expert_index.reshape(-1), minlength=o.num_experts)
        return Routing(expert_index, gates, apply_capacity(expert_index, o.num_experts, capacity), aux, load)


def chunk_noise(shape: tuple[int, ...], num_experts: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NoisyTopKRouter's noise for this context rank's chunk of hidden states of `shape` [s, b, h]:
    drawn for the whole sequence as one process draws it ([N s b, E], sequence-major; the context
    ranks of a replica share their RNG state), this rank's positions kept, as [s b, E]."""
    n, s, b = context_size(), shape[0], shape[1]
    whole = torch.randn(n * s * b, num_experts, dtype=dtype, device=device).view(n * s, b, num_experts)
    return whole[rank_positions(context_rank(), n, n * s, device)].reshape(s * b, num_experts)


class ExpertChoiceRouter(nn.Module):
    """Zhou et al. 2022: scores S = softmax(x W) per token; expert e takes the c tokens with the
    highest S[:, e], c = ceil(tokens * top_k / experts * capacity_factor); a token's output is the
    S-weighted sum over the experts that took it (possibly none). Balanced by construction."""

    def __init__(self, hidden_size: int, options: MoEOptions):
        super().__init__()
        self.options = options
        self.dtype = torch.float64 if options.router_dtype == "fp64" else torch.float32
        self.weight = nn.Parameter(torch.empty(options.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    @in_router_dtype
    def forward(self, x: torch.Tensor) -> Routing:
        o = self.options
        T, E = x.shape[0], o.num_experts
        scores = torch.softmax(F.linear(x.to(self.dtype), self.weight.to(self.dtype)), dim=-1)
        capacity = min(T, expert_capacity(T, o.top_k, E, o.capacity_factor or 1.0))
        chosen = scores.topk(capacity, dim=0).indices  # [c, E]: the tokens each expert takes
        kept = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        kept[chosen, torch.arange(E, device=x.device).expand_as(chosen)] = True
        expert_index = torch.arange(E, device=x.device).expand(T, E)
        load = kept.sum(0)
        return Routing(expert_index, scores.to(x.dtype), kept, scores.new_zeros(()), load)


def build_router(hidden_size: int, options: MoEOptions) -> nn.Module:
    if options.router == "noisy_topk":
        return NoisyTopKRouter(hidden_size, options)
    if options.router == "expert_choice":
        return ExpertChoiceRouter(hidden_size, options)
    return TopKRouter(hidden_size, options)
