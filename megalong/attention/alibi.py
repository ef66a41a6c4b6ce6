"""ALiBi (Press et al. 2022): a per-head linear penalty on query-key distance instead of positions."""
from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's slopes for `num_heads` heads, in float64.

    For a power of two n the slopes are 2^(-8i/n), i = 1..n. Otherwise the slopes of the closest
    smaller power of two m are followed by every other slope of 2m, as in the paper's reference code.
    """
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = power_of_two(num_heads)
    else:
        m = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(slopes: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Bias -slope * distance, shape [heads, *distance.shape]; distance = query pos - key pos."""
    return -slopes.view(-1, *([1] * distance.dim())) * distance.to(slopes.dtype)
