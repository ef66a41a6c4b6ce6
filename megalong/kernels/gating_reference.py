"""The torch form of MoE top-k gating: `TopKRouter`'s torch path (megalong/moe/router.py) and the
reference the fused gating kernel (moe.py) must equal. Plain torch, so it imports without Triton."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Gating:
    probs: torch.Tensor  # [T, E] router probabilities (float32)
    gates: torch.Tensor  # [T, k] combine weights (renormalised over the chosen when asked)
    expert_index: torch.Tensor  # [T, k] chosen experts, best first (int64)
    counts: torch.Tensor  # [E] assignments per expert (int64)


def reference_topk_gating(logits: torch.Tensor, k: int, renormalize: bool,
                          selection_bias: Optional[torch.Tensor] = None) -> Gating:
    """Softmax, top-k (chosen on probs + selection_bias when given: aux-loss-free balancing; the gates
    stay the probabilities), renormalised over the chosen when asked."""
    probs = torch.softmax(logits, dim=-1)
    if selection_bias is not None:
        index = (probs + selection_bias.to(probs.dtype)).topk(k, dim=-1).indices
        top = probs.gather(1, index)
    else:
        top, index = probs.topk(k, dim=-1)
    gates = top / top.sum(-1, keepdim=True) if renormalize else top
    return Gating(probs, gates, index, torch.bincount(index.reshape(-1), minlength=logits.shape[1]))
