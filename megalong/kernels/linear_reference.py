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
    """Katharopoulos's causal form on features fq [b, h, L, d], fk [b, g, L, d] and v [b, g, L, e]
    (g key/value groups dividing h: query head i reads group i // (h / g)), by chunks; `initial`:
    the state (S [b, g, d, e], z [b, g, d]) of the tokens before these (context parallelism: the
    earlier ranks' sums), zero when None. The state is kept per group; a group's query heads are
    stacked along the chunk's rows (no per-query-head copy of k or v)."""
    b, h, L, d = fq.shape
    g, e = fk.shape[1], v.shape[-1]
    j = h // g
    C = min(chunk_size, L)
    n = -(-L // C)
    pad = n * C - L  # padded keys are zero features: they add nothing to the sums
    Q, K, V = (F.pad(x, (0, 0, 0, pad)).view(b, x.shape[1], n, C, x.shape[-1]) for x in (fq, fk, v))
    if j > 1:  # [b, g, n, j * C, d]: row r * C + c is query head g * j + r at chunk position c
        Q = Q.view(b, g, j, n, C, d).transpose(2, 3).reshape(b, g, n, j * C, d)
    kv = torch.matmul(K.transpose(-1, -2), V)  # [b, h, n, d, e]: each chunk's sum of phi(k) v^T
    S = F.pad(torch.cumsum(kv, dim=2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # state before each chunk
    z = F.pad(torch.cumsum(K.sum(dim=3), dim=2), (0, 0, 1, 0))[:, :, :n]  # [b, h, n, d]
    if initial is not None:
        S, z = S + initial[0].unsqueeze(2), z + initial[1].unsqueeze(2)
    causal = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril().repeat(j, 1)
    A = torch.matmul(Q, K.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [b, g, n, j * C, C]
    num = torch.matmul(A, V) + torch.matmul(Q, S)
    den = A.sum(dim=-1) + (Q * z.unsqueeze(3)).sum(dim=-1)
    out = num / (den + eps).unsqueeze(-1)
    if j > 1:
        out = out.view(b, g, n, j, C, e).transpose(2, 3)
    return out.reshape(b, h, n * C, e)[:, :, :L]
