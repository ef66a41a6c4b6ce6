"""Grouped-query attention at context parallelism on one torchrun job of N gloo processes
(run by tests/context_attention_driver.py, in the same job as its cases): each kind's
context-parallel path takes the key/value groups (CoreAttention.grouped_context) and its outputs
and the gradients of its chunk's q, k, v equal, in float64 within 1e-10, the one-process `attend`
on the whole sequence with k and v copied per query head (plain multi-head attention, the
obviously right reference). The bytes received through the context exchanges
(megalong/parallel/comm_bytes.py) are then compared with the same chunk run with k and v copied
per query head before the module (what crossed the ranks before): heads / groups times fewer
where only keys and values cross (ring blocks, halos, linear states), fewer where queries or
per-head summaries cross too (lsh has no key groups: it shares queries and keys). Exits non-zero
at the first mismatch."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention.helpers import attention_config  # noqa: E402
from context_attention_driver import B, D, L, FamLayer, assert_chunk_equals, one_process, segments  # noqa: E402
from megalong.attention import ring_attention  # noqa: E402
from megalong.attention.base import per_query_head  # noqa: E402
from megalong.attention.registry import CORE_ATTENTION  # noqa: E402
from megalong.attention.segments import DocumentSegments  # noqa: E402
from megalong.parallel import comm_bytes  # noqa: E402
from megalong.parallel.context import rank_positions, set_layout  # noqa: E402

H, G = 4, 2  # query heads, key/value groups
CASES = [  # (name, kind, alibi, options, documents, layout, exact: bytes shrink by exactly H / G)
    ("global", "global", False, {}, False, "contiguous", True),
    ("global alibi documents", "global", True, {}, True, "contiguous", False),
    ("global zigzag alibi documents, tiles of 5", "global", True, {}, True, "zigzag", False, 5),
    ("local alibi dilations", "local", True, {"window": 4, "dilation": [1, 2, 1, 3]}, False, "contiguous", True),
    ("local window longer than a chunk", "local", False, {"window": 30, "dilation": [1, 2, 1, 1]}, False,
     "contiguous", True),
    ("local documents", "local", False, {"window": 6, "dilation": 2}, True, "contiguous", False),
    ("local global tokens alibi dilations documents", "local", True,
     {"window": 4, "dilation": [1, 2, 1, 3], "global_tokens": 2}, True, "contiguous", False),
    ("linear elu", "linear", False, {"chunk_size": 5}, False, "contiguous", True),
    ("linear elu documents", "linear", False, {"chunk_size": 5}, True, "contiguous", False),
    ("linear efficient", "linear", False, {"chunk_size": 5, "normalization": "efficient"}, False, "contiguous",
     True),
    ("linear efficient documents", "linear", False, {"chunk_size": 5, "normalization": "efficient"}, True,
     "contiguous", False),
    ("axial alibi documents", "axial", True, {"axial_shape": [12, 4]}, True, "contiguous", False),
]


def forward_bytes(module, inputs, params) -> int:
    """Bytes received by all the context ranks together in one forward of `module` on this rank's
    chunk (rank 0 of a halo receives nothing, so one rank's count is not enough)."""
    comm_bytes.reset()
    module(*[x.detach() for x in inputs], attention_mask=None, packed_seq_params=params)
    total = torch.tensor([sum(comm_bytes.received().values())], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item())


def check(name: str, kind: str, alibi: bool, options: dict, documents: bool, layout: str, exact: bool,
          tile: int = ring_attention.TILE) -> str:
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    set_layout(layout)
    default_tile, ring_attention.TILE = ring_attention.TILE, tile
    chunk = rank_positions(r, n, L)
    module = CORE_ATTENTION[kind](attention_config(H, D), layer_number=1, alibi=alibi, **options)
    assert module.grouped_context, name
    gen = torch.Generator().manual_seed(1)
    scale = 2 if options.get("global_tokens") else 1  # the local heads, then the global projection's
    q_full = torch.randn(L, B, scale * H, D, dtype=torch.float64, generator=gen)
    kv_full = [torch.randn(L, B, scale * G, D, dtype=torch.float64, generator=gen) for _ in range(2)]
    weight = torch.randn(L, B, H * D, dtype=torch.float64, generator=gen)
    seg = segments() if documents else None

    ref_in = [x.clone().requires_grad_() for x in (q_full, *kv_full)]
    q, k, v = (x.permute(1, 2, 0, 3) for x in ref_in)
    k, v = per_query_head(k, q.shape[1]), per_query_head(v, q.shape[1])  # plain multi-head attention
    ref = module.attend(q, k, v) if seg is None else module.attend_documents(q, k, v, seg)
    ref = ref.permute(2, 0, 1, 3).reshape(L, B, H * D)
    (ref * weight).sum().backward()

    params = None if seg is None else DocumentSegments(segment_ids=seg[:, chunk].contiguous())
    mine = [x[chunk].clone().requires_grad_() for x in (q_full, *kv_full)]
    out = module(*mine, attention_mask=None, packed_seq_params=params)
    (out * weight[chunk]).sum().backward()
    grouped = forward_bytes(module, mine, params)
    # the same chunk with k and v copied per query head before the module: what crossed before
    per_head = forward_bytes(module, [mine[0]] + [x.repeat_interleave(H // G, dim=2) for x in mine[1:]], params)
    set_layout("contiguous")
    ring_attention.TILE = default_tile

    error = (out - ref[chunk]).abs().max().item()
    assert error < 1e-10, (name, "output", r, error)
    for label, a, b in zip("qkv", mine, ref_in):
        error = (a.grad - b.grad[chunk]).abs().max().item()
        assert error < 1e-10, (name, "grad " + label, r, error)
        assert b.grad[chunk].abs().max().item() > 0, (name, "grad " + label, "all zero")
    if exact:
        assert per_head == grouped * H // G, (name, per_head, grouped)
    else:
        assert 0 < grouped < per_head, (name, per_head, grouped)
    return f"{name}: {per_head / grouped:.2f}x"


class GroupedFamLayer(FamLayer):
    """FamLayer (context_attention_driver.py) projecting G key/value groups; `copy`: k and v
    copied per query head after the projection (the reference's multi-head attention)."""

    def __init__(self, module, fam_length: int, seed: int):
        super().__init__(module, fam_length, seed)
        g = torch.Generator().manual_seed(seed + 100)
        w = H * D
        self.weights["qkv"] = (torch.randn(w, w + 2 * G * D, dtype=torch.float64, generator=g) * 0.1).requires_grad_()
        self.copy = False

    def qkv(self, h: torch.Tensor):
        s, b = h.shape[:2]
        q, kv = (h @ self.weights["qkv"]).split([H * D, 2 * G * D], dim=-1)
        k, v = kv.view(s, b, G, 2, D).unbind(3)
        if self.copy:
            k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
        return q.view(s, b, H, D), k, v


def check_fam(name: str, alibi: bool, options: dict) -> str:
    """Two grouped FAM layers in a row at CP equal the same layers with k and v copied per query
    head in one process (outputs, the input's and every weight's gradients, 1e-10 relative); the
    bytes received drop (the memory halo carries the groups, the FAM state is hidden-sized)."""
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    C = L // n
    chunk = slice(r * C, (r + 1) * C)
    layers = [GroupedFamLayer(CORE_ATTENTION["fam"](attention_config(H, D), layer_number=i + 1, alibi=alibi,
                                                    **options), options["fam_length"], seed=3 + i) for i in range(2)]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(L, B, H * D, dtype=torch.float64, generator=gen)
    weight = torch.randn(L, B, H * D, dtype=torch.float64, generator=gen)
    params = [p for layer in layers for p in layer.parameters()]

    def stack(h: torch.Tensor) -> torch.Tensor:
        return layers[1](layers[0](h))

    for layer in layers:
        layer.copy = True
    ref_in = x.clone().requires_grad_()
    ref = one_process(stack, ref_in)
    (ref * weight).sum().backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    comm_bytes.reset()
    stack(x[chunk])
    per_head = sum(comm_bytes.received().values())
    for layer in layers:
        layer.copy = False
    mine = x[chunk].clone().requires_grad_()
    comm_bytes.reset()
    out = stack(mine)
    grouped = sum(comm_bytes.received().values())
    (out * weight[chunk]).sum().backward()
    assert_chunk_equals(name, chunk, out, ref, mine, ref_in, params, ref_grads)
    totals = torch.tensor([per_head, grouped], dtype=torch.float64)
    dist.all_reduce(totals)
    assert 0 < totals[1] < totals[0], (name, totals)
    return f"{name}: {(totals[0] / totals[1]).item():.2f}x"


FAM_CASES = [  # (name, alibi, options): chunks of 24 (CP=2) and 12 (CP=4) tokens
    ("fam", False, {"block_size": 4, "memory_segments": 1, "fam_length": 2}),
    ("fam alibi, memory longer than a chunk", True, {"block_size": 6, "memory_segments": 3, "fam_length": 3}),
]


def run_cases() -> str:
    """Every case above on this job's context group; the summary line."""
    ratios = []
    for case in CASES:
        print("case", case[0], file=sys.stderr, flush=True)
        ratios.append(check(*case))
    for fam_case in FAM_CASES:
        print("case", fam_case[0], file=sys.stderr, flush=True)
        ratios.append(check_fam(*fam_case))
    return (f"grouped-query attention at CP={dist.get_world_size()}: {len(CASES) + len(FAM_CASES)} cases equal "
            f"one process with {G} key/value groups for {H} heads; forward bytes received, per query head / "
            f"grouped: {'; '.join(ratios)}")
