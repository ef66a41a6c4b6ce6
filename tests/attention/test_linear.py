"""`linear`: both normalizations against per-token loops written from the papers, the recurrent
form (generation) against the parallel form, in float64."""
import pytest
import torch

from attention.helpers import (
    D,
    assert_close_with_grads,
    attention_config,
    bhld,
    qkv,
    sbh,
)
from megalong.attention.linear import LinearAttention

TOL = 1e-9


def _phi(x):
    return torch.nn.functional.elu(x) + 1


def _linear_loop(q, k, v, eps):
    """Katharopoulos et al. eq. (8)-(9) token by token, on [b, h, L, d]."""
    outs = []
    for i in range(q.shape[2]):
        S = sum(_phi(k[:, :, j]).unsqueeze(-1) * v[:, :, j].unsqueeze(-2) for j in range(i + 1))
        z = sum(_phi(k[:, :, j]) for j in range(i + 1))
        num = (_phi(q[:, :, i]).unsqueeze(-1) * S).sum(-2)
        outs.append(num / ((_phi(q[:, :, i]) * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2)


def _efficient_loop(q, k, v):
    """Shen et al. made causal, token by token: softmax over features for q, over positions <= i
    for k (plain exponentials, no stabiliser)."""
    outs = []
    for i in range(q.shape[2]):
        weights = torch.softmax(k[:, :, :i + 1], dim=2)  # [b, h, i+1, d]: each feature over positions
        context = torch.einsum("bhjf,bhje->bhfe", weights, v[:, :, :i + 1])
        outs.append(torch.einsum("bhf,bhfe->bhe", torch.softmax(q[:, :, i], dim=-1), context))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("normalization", ["elu", "efficient"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_linear_equals_per_token_loop(normalization, chunk_size):
    L, heads = 10, 3
    q, k, v = qkv(L, heads)
    module = LinearAttention(attention_config(heads), 1, normalization=normalization, chunk_size=chunk_size,
                             eps=1e-3)
    b = [bhld(x) for x in (q, k, v)]
    ref = sbh(_linear_loop(*b, 1e-3) if normalization == "elu" else _efficient_loop(*b))
    assert_close_with_grads(module(q, k, v), ref, (q, k, v), TOL)


@pytest.mark.parametrize("normalization", ["elu", "efficient"])
def test_linear_recurrent_form_equals_parallel_form(normalization):
    L, heads = 9, 2
    q, k, v = qkv(L, heads)
    module = LinearAttention(attention_config(heads), 1, normalization=normalization, chunk_size=4)
    parallel = module(q, k, v).view(L, 2, heads, D)
    state = module.init_state(2, heads, D, q.device, q.dtype)
    for i in range(L):
        out, state = module.step(*(bhld(x[i:i + 1]) for x in (q, k, v)), state)
        assert out.shape == (2, heads, 1, D)
        assert (out[:, :, 0] - parallel[i]).abs().max().item() < 1e-12
    # Large keys: the running maximum keeps `efficient` finite where exp(k) alone overflows (token
    # by token; in chunks, keys of one feature must stay within ~700 of each other in float64).
    if normalization == "efficient":
        big = LinearAttention(attention_config(heads), 1, normalization="efficient", chunk_size=1)
        out = big(q.detach() * 300, k.detach() * 300, v.detach())
        assert torch.isfinite(out).all()
        assert torch.isinf(torch.exp(k.detach() * 300)).any()


def test_linear_refuses_alibi():
    with pytest.raises(ValueError, match="ALiBi"):
        LinearAttention(attention_config(2), 1, alibi=True)
