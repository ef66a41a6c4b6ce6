"""Auxiliary losses that keep routers balanced, each written as in its paper."""
from __future__ import annotations

from typing import Optional

import torch


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                      counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer: N * sum_i f_i * P_i, with f_i the fraction of token-to-expert assignments
    that go to expert i and P_i the mean router probability of expert i. Equals 1 when uniform.
    `counts`: the assignments per expert when already counted (else counted from expert_index)."""
    if counts is None:
        counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)
    f = counts.to(probs.dtype) / expert_index.numel()
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, Shazeer et al.'s balance measure (0 for one expert)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)
