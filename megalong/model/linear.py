"""Small additions to megatron-core's parallel linear layers."""
from __future__ import annotations

from typing import Any

from megatron.core.tensor_parallel import ColumnParallelLinear


class BiasFreeColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear that never has a bias.

    megatron gives the fused q/k/v projection a bias whenever the other linears have one
    (`add_bias_linear or add_qkv_bias`); GPT-Neo has biased output/MLP linears but bias-free q/k/v.
    """

    def __init__(self, *args: Any, bias: bool = False, **kwargs: Any):
        super().__init__(*args, bias=False, **kwargs)
