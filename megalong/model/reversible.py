"""Reversible decoder (RevNet, as in Reformer): activation memory that does not grow with depth.

The hidden state is carried as two streams. Layer i, built by megatron from megalong's spec as
usual, supplies the two residual functions

    F(x) = dropout(Attention(input_layernorm(x)))    (self_attention + its bias, hidden dropout)
    G(x) = dropout(MLP_or_MoE(pre_mlp_layernorm(x)))

and the pair is updated as y1 = x1 + F(x2), y2 = x2 + G(y1). `ReversibleStack` (a custom
autograd Function) runs every layer of the block without keeping any layer's input: it keeps
only the block's two outputs, and in backward walks the layers in reverse, recomputing
x2 = y2 - G(y1) and x1 = y1 - F(x2) and back-propagating through F and G on the way. Each layer's
RNG state (torch's CPU generator, the CUDA generator and megatron's CUDA RNG tracker where CUDA
exists) is captured before F and before G in the forward and replayed in the recomputation, so
dropout, noisy gating and any random rotation repeat exactly.

MoE layers: the auxiliary loss of G is computed in the forward and returned by the Function as an
extra output (set on the layer as `aux_loss`, so `moe_aux_loss` sums it once); its gradient reaches
the router through the recomputation. The recomputation restores the layer's `aux_loss` and `stats`
of the forward, so router statistics are counted once.

Streams from the embedding and merge at the end (`model.reversible_merge`):
- `mean` (default): both streams start as the embedding (x1 = x2 = e, as Reformer's `Dup`) and
  (y1 + y2) / 2 goes to the final layer norm. Since y1 + y2 = 2e + sum F + sum G and the final norm
  is scale-invariant, the embedding weighs twice as much against the layers' outputs as in the
  plain stack (e + sum F + sum G).
- `split`: both streams start as half the embedding (x1 = x2 = e / 2) and y1 + y2 goes to the
  final norm: exactly e + sum F + sum G, the plain stack's residual sum (each F and G still sees
  only its own stream, after its input norm).
- `second`: streams as in `mean`, y2 alone goes to the final norm.
All keep the hidden width, so the output layer (and tied embeddings) are unchanged.

fam layers (megalong/attention/fam.py): F(x) is the projected attention output of the block tokens
given x, with the layer's FAM chain (FAM tokens through attention, residual and the MLP, block by
block) computed inside F from x alone; G is the MLP on the block tokens. A coupling
y1 = x1 + F(x2) is invertible for any F that depends on x2 only (x1 = y1 - F(x2)), so the chain
needs no inverse of its own: it is recomputed from x2 in the backward, with F's RNG state. The
plain fam layer is y = h + MLP(h), h = x + F(x); the reversible pair keeps that F and G.

Pipeline stages: a stage that is not the last returns the pair concatenated along the sequence,
[2 * s, b, hidden] (x1 first), and a stage that is not the first takes that tensor from
`set_input_tensor` and splits it. The hidden width stays that of megatron's p2p buffers; the
pipeline schedule is asked for a sequence length of 2 * s (`seq_length` of megatron's
forward_backward_func) when the model is reversible.

The decoder keeps megatron's `TransformerBlock` modules and names (`decoder.layers.<i>...`,
`decoder.final_layernorm`): `make_reversible` only changes the block's class to
`ReversibleTransformerBlock`, so checkpoints and exports see the same parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

MERGES = ("mean", "split", "second")


# --------------------------------------------------------------------------------------------
# RNG capture and replay
# --------------------------------------------------------------------------------------------


_LAST: list = [None]


def _rng_state() -> tuple:
    """The generators' states; the previous tuple itself when nothing drew from them since (so
    that layers without randomness share one state instead of keeping a copy each)."""
    state = _capture()
    last = _LAST[0]
    if last is not None and all(_same(a, b) for a, b in zip(state, last)):
        return last
    _LAST[0] = state
    return state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is None and b is None


def _capture() -> tuple:
    cuda = tracker = None
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        cuda = torch.cuda.get_rng_state()
        tracker = get_cuda_rng_tracker().get_states()
    return torch.get_rng_state(), cuda, tracker


@contextmanager
def _replayed(state: tuple):
    """Run the body with the RNG state `state`, then put the current state back."""
    now = _capture()
    _set_rng_state(state)
    try:
        yield
    finally:
        _set_rng_state(now)


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, tracker = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(cuda)
        get_cuda_rng_tracker().set_states(tracker)


# --------------------------------------------------------------------------------------------
# The two residual functions of a megatron TransformerLayer
# --------------------------------------------------------------------------------------------


def _with_bias_dropout(layer: TransformerLayer, out_bias: tuple) -> torch.Tensor:
    out, bias = out_bias
    if bias is not None:
        out = out + bias
    return F.dropout(out, p=layer.hidden_dropout, training=layer.training)


def attention_branch(layer: TransformerLayer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """F(x): the layer's normed self-attention with its output bias and hidden dropout (a layer
    with its own forward supplies the attention half as `reversible_attention(x, **kwargs)`)."""
    own = getattr(layer, "reversible_attention", None)
    if own is not None:
        return _with_bias_dropout(layer, own(x, **kwargs))
    out = layer.self_attention(layer.input_layernorm(x), **{"attention_mask": None, **kwargs})
    return _with_bias_dropout(layer, out)


def mlp_branch(layer: TransformerLayer, x: torch.Tensor) -> torch.Tensor:
    """G(x): the layer's normed MLP (or MoE) with its output bias and hidden dropout."""
    return _with_bias_dropout(layer, layer.mlp(layer.pre_mlp_layernorm(x)))


def check_layer(layer: Any, index: int) -> None:
    """Only layers whose forward is megatron's own (attention then MLP), or that supply their
    attention half as `reversible_attention` (fam), split into F and G."""
    if not isinstance(layer, TransformerLayer) or (type(layer).forward is not TransformerLayer.forward
                                                   and not hasattr(layer, "reversible_attention")):
        raise ValueError(f"model.reversible: layer {index} ({type(layer).__name__}) has its own forward "
                         "and no `reversible_attention`, so it cannot be split into reversible "
                         "attention and MLP functions")


def _aux_of(layer: TransformerLayer) -> Optional[torch.Tensor]:
    return getattr(layer.mlp, "aux_loss", None) if hasattr(layer.mlp, "stats") else None


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


class ReversibleStack(torch.autograd.Function):
    """(x1, x2, spec, *params) -> (y1, y2, *aux losses of the MoE layers); saves only y1 and y2.

    spec = (layers, attention kwargs, params, record): `params` are the layers' trainable
    parameters, passed again as inputs so that their gradients come back through autograd."""

    @staticmethod
    def forward(ctx, x1, x2, spec, *params):
        layers, kwargs, ctx.params, ctx.record = spec
        ctx.layers, ctx.kwargs = layers, kwargs
        device = x1.device.type  # the recomputation runs under the forward's autocast
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.states, ctx.aux_layers = [], []
        aux_out = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                f_state = _rng_state()
                y1 = x1 + attention_branch(layer, x2, kwargs)
                g_state = _rng_state()
                y2 = x2 + mlp_branch(layer, y1)
                ctx.states.append((f_state, g_state))
                aux = _aux_of(layer)
                if aux is not None:
                    ctx.aux_layers.append(i)
                    aux_out.append(aux.detach())
                x1, x2 = y1, y2
        ctx.save_for_backward(x1, x2)
        return (x1, x2, *aux_out)

    @staticmethod
    def backward(ctx, dy1, dy2, *daux):
        y1, y2 = ctx.saved_tensors
        layers, kwargs = ctx.layers, ctx.kwargs
        aux_grad = dict(zip(ctx.aux_layers, daux))
        device, amp, amp_dtype = ctx.autocast
        autocast = lambda: torch.autocast(device, dtype=amp_dtype, enabled=amp)  # noqa: E731
        grads: dict[int, torch.Tensor] = {}
        for i in reversed(range(len(layers))):
            layer = layers[i]
            f_state, g_state = ctx.states[i]
            params = [p for p in layer.parameters() if p.requires_grad]
            # y2 = x2 + G(y1): recompute G(y1), get x2, back-propagate through G (and its aux loss).
            moe = hasattr(layer.mlp, "stats")
            kept = (layer.mlp.aux_loss, layer.mlp.stats) if moe else None
            with torch.enable_grad(), autocast(), _replayed(g_state):
                y1 = y1.detach().requires_grad_(True)
                g = mlp_branch(layer, y1)
                outs, outs_grad = [g], [dy2]
                if i in aux_grad:
                    outs.append(layer.mlp.aux_loss)
                    outs_grad.append(aux_grad[i])
            g_grads = torch.autograd.grad(outs, [y1] + params, outs_grad, allow_unused=True)
            with torch.no_grad():
                x2 = y2 - g
            dx1 = dy1 + g_grads[0]
            # y1 = x1 + F(x2): recompute F(x2), get x1, back-propagate through F.
            with torch.enable_grad(), autocast(), _replayed(f_state):
                x2 = x2.detach().requires_grad_(True)
                f = attention_branch(layer, x2, kwargs)
            # the forward's loss and statistics stand; the recomputation is not counted
            if moe:
                layer.mlp.aux_loss, layer.mlp.stats = kept
            f_grads = torch.autograd.grad(f, [x2] + params, dx1, allow_unused=True)
            with torch.no_grad():
                x1 = y1.detach() - f
            dx2 = dy2 + f_grads[0]
            for p, a, b in zip(params, g_grads[1:], f_grads[1:]):
                for part in (a, b):
                    if part is not None:
                        grads[id(p)] = part if id(p) not in grads else grads[id(p)] + part
            y1, y2, dy1, dy2 = x1.detach(), x2.detach(), dx1, dx2
        if ctx.record is not None:
            ctx.record((y1, y2))  # the block's inputs as recomputed
        return (dy1, dy2, None, *[grads.get(id(p)) for p in ctx.params])


def run_reversible(layers: list, x1: torch.Tensor, x2: torch.Tensor, kwargs: dict,
                   record: Optional[Callable[[tuple], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `layers` as reversible pairs on the streams (x1, x2); returns (y1, y2).

    MoE layers' `aux_loss` becomes the Function's output, so that a sum over them back-propagates
    into the recomputation. `record(inputs)` receives the block's inputs as recomputed in backward
    (for tests)."""
    for i, layer in enumerate(layers):
        check_layer(layer, i)
    params = _unique_params(layers)
    out = ReversibleStack.apply(x1, x2, (layers, kwargs, params, record), *params)
    aux = iter(out[2:])
    for layer in layers:
        if _aux_of(layer) is not None:
            layer.mlp.aux_loss = next(aux)
            layer.mlp.ran_without_autograd = False  # its aux loss has a graph: through the Function
    return out[0], out[1]


def _unique_params(layers: list) -> list:
    seen, out = set(), []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


def merge_streams(y1: torch.Tensor, y2: torch.Tensor, merge: str) -> torch.Tensor:
    """The block's output from its two streams (see `model.reversible_merge` above)."""
    if merge == "mean":
        return (y1 + y2) / 2
    return y1 + y2 if merge == "split" else y2


class ReversibleTransformerBlock(TransformerBlock):
    """megatron's TransformerBlock whose layers run as reversible pairs (see the module docstring)."""

    reversible_merge: str = "mean"

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                context: Any = None, context_mask: Any = None, rotary_pos_emb: Any = None,
                rotary_pos_cos: Any = None, rotary_pos_sin: Any = None, rotary_pos_cos_sin: Any = None,
                attention_bias: Any = None, inference_context: Any = None, packed_seq_params: Any = None,
                sequence_len_offset: Any = None, padding_mask: Any = None, **unused: Any):
        if inference_context is not None or context is not None:
            raise NotImplementedError("model.reversible: inference contexts and cross-attention")
        if self.pre_process:
            x1 = x2 = hidden_states / 2 if self.reversible_merge == "split" else hidden_states
        else:
            x1, x2 = self.input_tensor.chunk(2, dim=0)
        kwargs = {"attention_mask": attention_mask, "rotary_pos_emb": rotary_pos_emb,
                  "rotary_pos_cos": rotary_pos_cos, "rotary_pos_sin": rotary_pos_sin,
                  "attention_bias": attention_bias, "packed_seq_params": packed_seq_params,
                  "sequence_len_offset": sequence_len_offset}
        if rotary_pos_cos_sin is not None:
            kwargs["rotary_pos_cos_sin"] = rotary_pos_cos_sin
        if len(self.layers):
            x1, x2 = run_reversible(list(self.layers), x1, x2, kwargs, getattr(self, "_record", None))
        if not self.post_process:
            return torch.cat([x1, x2], dim=0)
        hidden = merge_streams(x1, x2, self.reversible_merge)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden


def make_reversible(block: TransformerBlock, merge: str = "mean") -> TransformerBlock:
    """Turn megatron's decoder `block` into its reversible version in place (same modules)."""
    if merge not in MERGES:
        raise ValueError(f"model.reversible_merge: must be one of {', '.join(MERGES)}, got {merge!r}")
    for i, layer in enumerate(block.layers):
        check_layer(layer, i)
    block.__class__ = ReversibleTransformerBlock
    block.reversible_merge = merge
    return block


def apply_memory_options(model: torch.nn.Module, cfg: Any) -> None:
    """`model.reversible` and `execution.ffn_chunks` of Config `cfg` applied to a built GPTModel."""
    from megalong.model.chunked_ffn import chunk_mlps

    if cfg.execution.ffn_chunks > 1:
        chunk_mlps(model, cfg.execution.ffn_chunks)
    if cfg.model.reversible:
        make_reversible(model.decoder, cfg.model.reversible_merge)
