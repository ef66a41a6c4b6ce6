"""The contract every attention kind of the registry meets, in float64 on small shapes:

- causality: no output depends on a later token (gradients), and changing later tokens leaves
  earlier outputs as they are (for kinds that say they are `prefix_stable`);
- TP=2 equals TP=1: each rank's heads, by global head index, compute what one process computes
  (a faked tensor-parallel group, no processes; ALiBi on where the kind's options support it);
- decode equals attend: the incremental path (`CoreAttention.decode`: key/value cache, recurrent
  state or recomputation) fed a prompt and then tokens gives what attending the context so far
  gives, and for prefix-stable kinds what attending the whole sequence gives;
- memory: forward and backward memory growth from L = 256 to 1024 (helpers.MemoryTracker).

Parametrised over megalong.attention.registry.ATTENTION_KINDS: a new kind is collected here at
once and fails until CASES and MEMORY below say how to build it small. Capabilities come from the
code: `prefix_stable` on the module, ALiBi support on the options class, and whether the registry
replaces the kind's TransformerLayer (then the core attention runs inside that layer: LAYER_RUNNERS).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from attention.helpers import (
    attention_config,
    bhld,
    forward_backward_memory,
    head_index,
    max_diff,
    qkv,
    sbh,
    supports_alibi,
    tp,
)
from megalong.attention.fam import FamTransformerLayer, fam_block_context
from megalong.attention.registry import ATTENTION_KINDS

L, HEADS = 16, 4


@dataclass(frozen=True)
class Case:
    options: dict
    # 2: the core attention takes the local heads, then as many global-projection heads (local's
    # global tokens, which LocalSelfAttention projects twice).
    head_sets: int = 1
    # Where the kind promises it: the values of every earlier token reach each output.
    reaches_every_earlier_token: bool = False


@dataclass(frozen=True)
class MemoryCase:
    options: Callable[[int], dict]  # the options at sequence length L
    alibi: bool
    head_sets: int = 1
    max_growth: float = 4.5  # peak(1024) <= max_growth * peak(256): ~linear is 4x
    largest_below: float = 0.25  # at L = 1024 no tensor created has largest_below * L * L elements
    quadratic: bool = False  # the other side: an L x L tensor, and the peak grows ~16x


# Small options for causality, TP and decode (sequence L = 16, HEADS = 4 heads of 8).
CASES: dict[str, dict[str, Case]] = {
    "global": {"causal": Case({}, reaches_every_earlier_token=True)},
    "local": {"dilated_global_tokens": Case({"window": 3, "dilation": [1, 2, 3, 1], "global_tokens": [0, 2]},
                                            head_sets=2),
              "dilated": Case({"window": 3, "dilation": [1, 2, 3, 1]})},  # the key/value-cache decode
    "linear": {"elu": Case({"chunk_size": 4}, reaches_every_earlier_token=True),
               "efficient": Case({"normalization": "efficient", "chunk_size": 4}, reaches_every_earlier_token=True)},
    "axial": {"4x4": Case({"axial_shape": [4, 4]}, reaches_every_earlier_token=True)},
    "lsh": {"2_rounds": Case({"n_hashes": 2, "bucket_size": 4, "seed": 1})},
    "fam": {"memory_1": Case({"block_size": 4, "memory_segments": 1, "fam_length": 2},
                             reaches_every_earlier_token=True)},
}

# Memory at L = 256 and 1024, 2 heads of 8, float32.
MEMORY: dict[str, dict[str, MemoryCase]] = {
    # ALiBi's explicit L x L bias: the quadratic reference point the tracker must see.
    "global": {"alibi": MemoryCase(lambda n: {}, alibi=True, quadratic=True)},
    "local": {"dilated_global_tokens_alibi": MemoryCase(
        lambda n: {"window": 16, "dilation": [1, 3], "global_tokens": [0, 1]}, alibi=True, head_sets=2)},
    "linear": {"elu": MemoryCase(lambda n: {"chunk_size": 16}, alibi=False),
               "efficient": MemoryCase(lambda n: {"normalization": "efficient", "chunk_size": 32}, alibi=False)},
    # L * (rows + cols): on square grids 4x the length is 8x (fixed columns: test_axial.py).
    "axial": {"square_alibi": MemoryCase(lambda n: {"axial_shape": [math.isqrt(n)] * 2}, alibi=True,
                                         max_growth=8.5)},
    "lsh": {"alibi": MemoryCase(lambda n: {"n_hashes": 2, "bucket_size": 16}, alibi=True, largest_below=1.0)},
    "fam": {"alibi": MemoryCase(lambda n: {"block_size": 16, "memory_segments": 1, "fam_length": 4}, alibi=True,
                                largest_below=1.0)},
}


def _in_fam_layer(module, q, k, v):
    """fam's core attention needs its layer (FAM tokens pass the residual and the MLP block by
    block): fam.py's `fam_block_context` with head-wise stand-ins for the layer's weights. The
    input holds each head's q, k, v; the residual adds a head's context to its own q, k, v; the
    MLP is h + tanh(h); the initial FAM is fixed random. Nothing mixes heads or positions, so
    causality and the TP split are the attention's own. Returns [L, b, heads * d]."""
    h, d = q.shape[2:]
    x = torch.stack([q, k, v], dim=3).flatten(2)  # [s, b, h * 3 * d]
    fam_init = None
    if module.fam_length:
        g = torch.Generator().manual_seed(11)
        every_head = torch.randn(module.fam_length, module.total_heads, 3, d, generator=g, dtype=q.dtype)
        fam_init = every_head[:, module.first_head:module.first_head + h].flatten(1)

    def project(t):
        return t.view(*t.shape[:2], h, 3, d).unbind(3)

    def attention_residual(ctx, residual):
        return residual + ctx.view(*ctx.shape[:2], h, 1, d).expand(-1, -1, -1, 3, -1).flatten(2)

    def mlp_residual(t):
        return t + torch.tanh(t)

    return fam_block_context(x, fam_init, module, project, attention_residual, mlp_residual)


# How the contract runs a kind whose registry entry replaces the TransformerLayer.
LAYER_RUNNERS: dict[type, Callable] = {FamTransformerLayer: _in_fam_layer}


def _params(table: dict) -> list:
    out = []
    for kind in ATTENTION_KINDS:
        out += [pytest.param(kind, variant, id=f"{kind}-{variant}") for variant in table.get(kind) or ["missing"]]
    return out


def _case(table: dict, name: str, kind: str, variant: str):
    if kind not in table:
        pytest.fail(f"attention kind '{kind}' is in the registry but not in {name} of tests/attention/test_contract.py")
    return table[kind][variant]


def _runner(kind: str) -> Callable:
    layer = ATTENTION_KINDS[kind].layer
    if layer is TransformerLayer:
        return lambda module, q, k, v: module(q, k, v)
    if layer not in LAYER_RUNNERS:
        pytest.fail(f"attention kind '{kind}' runs in {layer.__name__}: add a runner to LAYER_RUNNERS")
    return LAYER_RUNNERS[layer]


def _build(kind: str, options: dict, heads: int = HEADS, alibi: bool = False, pg_collection: object | None = None):
    return ATTENTION_KINDS[kind].core(attention_config(heads), 1, alibi=alibi, pg_collection=pg_collection,
                                      **options)


def _inputs(case: Case, heads: int, seed: int = 0) -> list[torch.Tensor]:
    q, k, v = qkv(L, heads, seed=seed)
    if case.head_sets == 2:  # local heads, then the global-projection heads
        qg, kg, vg = qkv(L, heads, seed=seed + 7)
        return [torch.cat([a, b], 2).detach().requires_grad_() for a, b in ((q, qg), (k, kg), (v, vg))]
    return [q, k, v]


def test_tables_name_registered_kinds_only():
    for table in (CASES, MEMORY, {layer: None for layer in LAYER_RUNNERS}):
        for key in table:
            assert key in ATTENTION_KINDS or key in {entry.layer for entry in ATTENTION_KINDS.values()}, key


# ------------------------------------------------------------------------------------------------
# causality
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,variant", _params(CASES))
def test_no_output_depends_on_a_later_token(kind, variant):
    case = _case(CASES, "CASES", kind, variant)
    run = _runner(kind)
    module = _build(kind, case.options)
    q, k, v = _inputs(case, HEADS)
    out = run(module, q, k, v)
    for t in (0, 5, 10, 15):
        # allow_unused: lsh's keys are its normalised queries, `k` is not used
        grads = torch.autograd.grad(out[t].sum(), (q, k, v), retain_graph=True, allow_unused=True)
        for g in grads:
            assert g is None or not g[t + 1:].any(), (kind, t)
        if case.reaches_every_earlier_token:
            assert (grads[2][:t + 1].abs().sum(dim=(1, 3)) > 0).all(), (kind, t)


@pytest.mark.parametrize("kind,variant", _params(CASES))
def test_changing_later_tokens_leaves_earlier_outputs(kind, variant):
    case = _case(CASES, "CASES", kind, variant)
    run = _runner(kind)
    module = _build(kind, case.options)
    if not module.prefix_stable:
        pytest.skip(f"{type(module).__name__}.prefix_stable is False: earlier outputs depend on the context")
    q, k, v = _inputs(case, HEADS)
    out = run(module, q, k, v)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[9:] = torch.randn_like(x[9:])
    assert max_diff(run(module, q2, k2, v2)[:9], out[:9]) < 1e-12


# ------------------------------------------------------------------------------------------------
# tensor parallelism: each rank's heads, by global head index, compute what one process computes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,variant", _params(CASES))
def test_head_split_over_two_ranks_equals_one(kind, variant):
    case = _case(CASES, "CASES", kind, variant)
    run = _runner(kind)
    alibi = supports_alibi(kind)
    q, k, v = _inputs(case, HEADS)
    full = run(_build(kind, case.options, alibi=alibi), q, k, v)
    halves = []
    for rank in range(2):
        module = _build(kind, case.options, alibi=alibi, pg_collection=tp(rank, 2))
        assert module.first_head == 2 * rank
        sl = head_index(case.head_sets, HEADS, rank, 2)
        halves.append(run(module, q[:, :, sl], k[:, :, sl], v[:, :, sl]))
    assert max_diff(torch.cat(halves, dim=-1), full) < 1e-12


# ------------------------------------------------------------------------------------------------
# decode: a prompt, then tokens one and more at a time
# ------------------------------------------------------------------------------------------------

STEPS = [(0, 5), (5, 6), (6, 9), *((i, i + 1) for i in range(9, L))]


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("kind,variant", _params(CASES))
def test_decode_equals_attend(kind, variant, alibi):
    case = _case(CASES, "CASES", kind, variant)
    layer = ATTENTION_KINDS[kind].layer
    if layer is not TransformerLayer:
        pytest.skip(f"runs inside {layer.__name__}: generation reruns that layer, no core-attention decode")
    if alibi and not supports_alibi(kind):
        pytest.skip(f"{kind}'s options do not support ALiBi")
    module = _build(kind, case.options, alibi=alibi)
    q, k, v = (x.detach() for x in _inputs(case, HEADS))
    state, pieces = None, []
    for start, stop in STEPS:
        out, state = module.decode(*(bhld(x[start:stop]) for x in (q, k, v)), state)
        context = module(q[:stop], k[:stop], v[:stop])[start:]
        assert max_diff(sbh(out), context) < 1e-12, (start, stop)
        pieces.append(sbh(out))
    if module.prefix_stable:
        assert max_diff(torch.cat(pieces), module(q, k, v)) < 1e-12


# ------------------------------------------------------------------------------------------------
# memory growth and the largest tensor
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,variant", _params(MEMORY))
def test_memory_growth(kind, variant):
    case = _case(MEMORY, "MEMORY", kind, variant)
    run = _runner(kind)

    def tracked(n):
        module = _build(kind, case.options(n), heads=2, alibi=case.alibi)
        if case.head_sets == 2:  # the global-projection heads equal the local ones
            return forward_backward_memory(lambda q, k, v: run(module, *(torch.cat([x, x], 2) for x in (q, k, v))), n)
        return forward_backward_memory(lambda q, k, v: run(module, q, k, v), n)

    small, large = tracked(256), tracked(1024)
    if case.quadratic:
        assert large.peak >= 12 * small.peak, (small.peak, large.peak)
        assert large.largest >= 1024 * 1024
        return
    assert large.peak <= case.max_growth * small.peak, (small.peak, large.peak)
    assert small.largest < 256 * 256 and large.largest < 1024 * 1024, (small.largest_shape, large.largest_shape)
    assert large.largest < case.largest_below * 1024 * 1024, large.largest_shape
