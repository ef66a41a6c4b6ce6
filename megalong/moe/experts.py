"""The experts: E independent MLPs stored as stacked weights, run on their contiguous tokens."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Experts(nn.Module):
    """E MLPs h -> f -> h (gated when `gated`: act(x W1) * (x W3)). Runs one matmul pair per
    expert over that expert's rows (a loop over experts, never over tokens)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, activation: Callable, gated: bool,
                 init_std: float, output_std: float):
        super().__init__()
        self.activation, self.gated = activation, gated
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=output_std)
        if gated:
            self.w3 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
            nn.init.normal_(self.w3, std=init_std)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on rows x (also the reference the tests loop over)."""
        h = self.activation(x @ self.w1[e])
        if self.gated:
            h = h * (x @ self.w3[e])
        return h @ self.w2[e]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        chunks = x.split(tokens_per_expert.tolist())
        return torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)], dim=0)
