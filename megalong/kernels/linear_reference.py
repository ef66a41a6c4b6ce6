"""The torch form of causal linear attention with phi = elu + 1: `LinearAttention`'s torch path
(megalong/attention/linear.py) and the reference the chunked kernel (linear_attention.py) must equal.
Plain torch, so it imports without Triton."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, eps: float,
                            chunk_size: int, initial: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> torch.Tensor:
    """Katharopoulos's causal form on features fq, fk [b, h, L, d] and v [b, h, L, e], by chunks;
    `initial`: the state (S [b, h, d, e], z [b, h, d]) of the tokens before these (context
    parallelism: the earlier ranks' sums), zero when None."""
    b, h, L, d = fq.shape
    e = v.shape[-1]
    C = min(chunk_size, L)
    n = -(-L // C)
    pad = n * C - L  # padded keys are zero features: they add nothing to the sums
    Q, K, V = (F.pad(x, (0, 0, 0, pad)).view(b, h, n, C, x.shape[-1]) for x in (fq, fk, v))
    kv = torch.matmul(K.transpose(-1, -2), V)  # [b, h, n, d, e]: each chunk's sum of phi(k) v^T
    S = F.pad(torch.cumsum(kv, dim=2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # state before each chunk
    z = F.pad(torch.cumsum(K.sum(dim=3), dim=2), (0, 0, 1, 0))[:, :, :n]  # [b, h, n, d]
    if initial is not None:
        S, z = S + initial[0].unsqueeze(2), z + initial[1].unsqueeze(2)
    causal = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    A = torch.matmul(Q, K.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [b, h, n, C, C]
    num = torch.matmul(A, V) + torch.matmul(Q, S)
    den = A.sum(dim=-1) + (Q * z.unsqueeze(3)).sum(dim=-1)
    out = num / (den + eps).unsqueeze(-1)
    return out.reshape(b, h, n * C, e)[:, :, :L]
