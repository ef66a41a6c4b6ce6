"""Token permutation: each expert's tokens made contiguous, and put back weighted by their gates."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    order: torch.Tensor  # [N] kept assignments sorted by expert (stable: token order inside an expert)
    token: torch.Tensor  # [N] source token of each sorted assignment
    gate: torch.Tensor  # [N] its combine weight
    expert: torch.Tensor  # [N] its expert (ascending)
    tokens_per_expert: torch.Tensor  # [E]


def plan(expert_index: torch.Tensor, gates: torch.Tensor, kept: torch.Tensor, num_experts: int) -> Dispatch:
    T, k = expert_index.shape
    token = torch.arange(T, device=expert_index.device).unsqueeze(1).expand(T, k)[kept]
    expert = expert_index[kept]
    order = torch.argsort(expert, stable=True)
    return Dispatch(order, token[order], gates[kept][order], expert[order],
                    torch.bincount(expert, minlength=num_experts))


def permute(x: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """[T, h] -> [N, h], rows grouped by expert."""
    return x.index_select(0, d.token)


def unpermute(y: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """[N, h] expert outputs -> [T, h], each token the gate-weighted sum of its experts' outputs
    (zero for a token every expert dropped)."""
    out = y.new_zeros(num_tokens, y.shape[1])
    return out.index_add(0, d.token, y * d.gate.unsqueeze(1).to(y.dtype))
