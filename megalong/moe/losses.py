"""Auxiliary losses that keep routers balanced, each written as in its paper.

`total` sums a tensor of per-token sums over the pieces of the sequence the tokens are one part of
(the context-parallel chunks: megalong.parallel.context.context_sum); the losses are then those of
the whole sequence. The default, one piece, is the identity."""
from __future__ import annotations

from typing import Callable, Optional

import torch

Total = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                      counts: Optional[torch.Tensor] = None, total: Total = _identity) -> torch.Tensor:
    """Switch Transformer: N * sum_i f_i * P_i, with f_i the fraction of token-to-expert assignments
    that go to expert i and P_i the mean router probability of expert i. Equals 1 when uniform.
    `counts`: the assignments per expert when already counted (else counted from expert_index)."""
    if counts is None:
        counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)
    sizes = torch.tensor([expert_index.numel(), probs.shape[0]], dtype=probs.dtype, device=probs.device)
    counted = total(torch.cat([counts.to(probs.dtype), sizes]))  # no gradient: one sum for both
    f = counted[:num_experts] / counted[num_experts]
    p = total(probs.sum(dim=0)) / counted[num_experts + 1]
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, total: Total = _identity) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    lse2 = torch.logsumexp(logits, dim=-1).pow(2)
    both = total(torch.stack([lse2.sum(), lse2.new_tensor(float(lse2.shape[0]))]))
    return both[0] / both[1]


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, Shazeer et al.'s balance measure (0 for one expert)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)
