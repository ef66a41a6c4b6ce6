"""The experts: E independent MLPs stored as stacked weights, run on their contiguous tokens."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Experts(nn.Module):
    """E MLPs h -> f -> h (gated when `gated`: act(x W1) * (x W3)). Runs one matmul pair per
    expert over that expert's rows (a loop over experts, never over tokens)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, activation: Callable, gated: bool,
                 init_std: float, output_std: float, first: int = 0, count: int | None = None):
        """Holds experts [first, first + count) of num_experts. All experts' weights are drawn
        from the RNG and sliced, so any expert-parallel layout starts from the same weights."""
        super().__init__()
        self.activation, self.gated = activation, gated
        count = num_experts if count is None else count
        local = slice(first, first + count)

        def weight(shape, std):
            full = torch.empty(num_experts, *shape)
            nn.init.normal_(full, std=std)
            return nn.Parameter(full[local].clone())

        self.w1 = weight((hidden, ffn), init_std)
        self.w2 = weight((ffn, hidden), output_std)
        if gated:
            self.w3 = weight((hidden, ffn), init_std)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on rows x (also the reference the tests loop over)."""
        h = self.activation(x @ self.w1[e])
        if self.gated:
            h = h * (x @ self.w3[e])
        return h @ self.w2[e]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        chunks = x.split(tokens_per_expert.tolist())
        return torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)], dim=0)
