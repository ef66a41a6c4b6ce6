"""A hand-written PyTorch GPT, the peer that bench/train_throughput.py times beside megalong.

nanoGPT-style and GPT-Neo-shaped: learned positions, pre-LayerNorm blocks with a fused qkv Linear
(no bias) and an output Linear, a 4x GELU (tanh) MLP, the LM head tied to the token embedding and
cross-entropy in float32 on the logits. Attention is F.scaled_dot_product_attention (causal, the
default 1/sqrt(head_dim) scale) in every layer, or, with `flex_local`, FlexAttention with a causal
sliding-window block mask in the odd (local) layers, global/local alternating as in GPT-Neo.
The definition matches the team's reference probe (shared/bench/peer_gpt.py), so its figures compare.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, hidden: int, heads: int, local: bool) -> None:
        super().__init__()
        self.heads = heads
        self.local = local
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp_in = nn.Linear(hidden, 4 * hidden)
        self.mlp_out = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor, block_mask=None) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = (self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, hidden // self.heads)
                   .permute(2, 0, 3, 1, 4))  # 3 x (batch, heads, seq, head_dim)
        if self.local and block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            attn = flex_attention(q, k, v, block_mask=block_mask)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    """Token + learned position embeddings, `layers` blocks, final LayerNorm, tied LM head.
    forward(tokens) returns the mean cross-entropy of the logits against `tokens` themselves, as
    the reference does (unshifted: throughput does not depend on the targets)."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq: int, flex_local: bool) -> None:
        super().__init__()
        self.vocab = vocab
        self.token_embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList([Block(hidden, heads, local=flex_local and i % 2 == 1)
                                     for i in range(layers)])
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, tokens: torch.Tensor, block_mask=None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, block_mask)
        logits = F.linear(self.final_norm(x), self.token_embedding.weight)
        return F.cross_entropy(logits.float().view(-1, self.vocab), tokens.view(-1))


def sliding_window_mask(seq: int, window: int, device: torch.device):
    """FlexAttention block mask: causal, each query sees itself and the `window - 1` keys before it."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_window(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(causal_window, None, None, seq, seq, device=device)


def make_peer_step(cfg, vocab: int, batch: int, seq: int, device: torch.device, compile: bool,
                   flex_local: bool) -> Callable[[], None]:
    """One training step of PeerGPT in the shape of megalong config `cfg` (hidden size, layers,
    heads; the local window from cfg.attention_options("local")) on random tokens: forward (bf16
    autocast on CUDA, float32 on the CPU), backward, AdamW (fused on CUDA), zero_grad.
    `compile`: the model under torch.compile; `flex_local`: FlexAttention local layers."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    m = cfg.model
    torch.manual_seed(0)
    model = PeerGPT(vocab, m.hidden_size, m.num_layers, m.num_attention_heads, seq, flex_local).to(device).train()
    block_mask: Optional[object] = None
    if flex_local:
        block_mask = sliding_window_mask(seq, cfg.attention_options("local").window, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=True if cuda else None)
    forward = torch.compile(model) if compile else model
    tokens = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = forward(tokens, block_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
