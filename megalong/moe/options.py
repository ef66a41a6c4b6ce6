"""MoE options of the config (`model.moe`); torch-free so the config validates without imports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice")


@dataclass
class MoEOptions:
    num_experts: int = 8
    top_k: int = 2
    # topk: GShard/Mixtral top-k, weights renormalised over the chosen experts;
    # switch: top-1 (Fedus et al.), the gate is the router probability;
    # noisy_topk: Shazeer et al. 2017, tunable Gaussian noise before the top-k, softmax over the kept;
    # expert_choice: Zhou et al. 2022, each expert picks its top tokens. It looks at the whole batch,
    # so a token's routing depends on later tokens: it leaks the future in a causal LM.
    router: Literal["topk", "switch", "noisy_topk", "expert_choice"] = "topk"
    capacity_factor: Optional[float] = 1.25  # expert capacity = ceil(tokens * top_k / experts * factor)
    dropless: bool = False  # never drop a token (ignores capacity_factor)
    num_shared_experts: int = 0  # always-on experts (DeepSeekMoE), one MLP of that many expert widths
    expert_hidden_size: Optional[int] = None  # default: the dense MLP's width
    aux_loss_coeff: float = 0.01  # switch/topk: load balance; noisy_topk: importance and load
    z_loss_coeff: float = 0.0  # router z-loss mean(logsumexp(logits)^2)
    router_dtype: Literal["fp32", "fp64"] = "fp32"
    # Aux-loss-free balancing (DeepSeek-V3), topk/switch: a per-expert bias added to the scores for
    # choosing experts only, moved by rate * sign(mean load - load) after every step. 0 disables.
    bias_update_rate: float = 0.0
