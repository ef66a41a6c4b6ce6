"""Every context-parallel attention case on one torchrun job of N gloo processes
(`python -m torch.distributed.run --nproc_per_node N tests/context_attention_driver.py`): each rank
runs the module on its chunk of the sequence (forward through megatron's layout, as a model calls
it) and compares its outputs and the gradients of its chunk's q, k, v with the same module's
one-process `attend` on the whole sequence, in float64. Exits non-zero at the first mismatch;
refused combinations must raise their one-line error."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention.helpers import attention_config, forward_backward_memory  # noqa: E402
from megalong.attention import fam as fam_module  # noqa: E402
from megalong.attention import ring_attention  # noqa: E402
from megalong.attention.registry import CORE_ATTENTION  # noqa: E402
from megalong.attention.segments import DocumentSegments  # noqa: E402
from megalong.parallel.context import rank_positions, set_layout  # noqa: E402

L, B, H, D = 48, 2, 4, 8
CASES = [  # (name, kind, alibi, options, documents[, layout])
    ("global", "global", False, {}, False),
    ("global alibi", "global", True, {}, False),
    ("global alibi documents", "global", True, {}, True),
    ("global zigzag", "global", False, {}, False, "zigzag"),
    ("global zigzag alibi documents", "global", True, {}, True, "zigzag"),
    ("global zigzag alibi documents, tiles of 5", "global", True, {}, True, "zigzag", 5),
    ("global alibi, tiles of 7", "global", True, {}, False, "contiguous", 7),
    ("local window 5", "local", False, {"window": 5}, False),
    ("local alibi dilations", "local", True, {"window": 4, "dilation": [1, 2, 1, 3]}, False),
    ("local window longer than a chunk", "local", True, {"window": 30, "dilation": [1, 2, 1, 1]}, False),
    ("local documents", "local", False, {"window": 6, "dilation": 2}, True),
    ("local window of three chunks at CP=4", "local", False, {"window": 33, "dilation": [1, 1, 1, 1]}, False),
    ("local global tokens", "local", False, {"window": 5, "global_tokens": [0, 3, 17, 30, 40]}, False),
    ("local global tokens alibi dilations documents", "local", True,
     {"window": 4, "dilation": [1, 2, 1, 3], "global_tokens": 2}, True),
    ("local global tokens window longer than a chunk", "local", True,
     {"window": 20, "dilation": [1, 2, 1, 1], "global_tokens": [5, 13, 25]}, False),
    ("linear elu", "linear", False, {"chunk_size": 5}, False),
    ("linear elu documents", "linear", False, {"chunk_size": 5}, True),
    ("linear elu one document over several ranks", "linear", False, {"chunk_size": 4}, "long"),
    ("linear efficient", "linear", False, {"chunk_size": 5, "normalization": "efficient"}, False),
    ("linear efficient documents", "linear", False, {"chunk_size": 5, "normalization": "efficient"}, True),
    ("linear efficient one document over several ranks", "linear", False,
     {"chunk_size": 4, "normalization": "efficient"}, "long"),
    ("lsh", "lsh", False, {"bucket_size": 4, "n_hashes": 2}, False),
    ("lsh alibi documents", "lsh", True, {"bucket_size": 6, "n_hashes": 3}, True),
    ("lsh fixed buckets", "lsh", False, {"bucket_size": 4, "n_buckets": 6}, False),
    ("axial", "axial", False, {"axial_shape": [8, 6]}, False),
    ("axial alibi documents", "axial", True, {"axial_shape": [12, 4]}, True),
    ("axial one row per chunk", "axial", True, {"axial_shape": [4, 12]}, False),
]
FAM_CASES = [  # (name, alibi, options[, documents]): chunks of 24 (CP=2) and 12 (CP=4) tokens
    ("fam", False, {"block_size": 4, "memory_segments": 1, "fam_length": 2}),
    ("fam alibi, memory longer than a chunk", True, {"block_size": 6, "memory_segments": 3, "fam_length": 3}),
    ("fam one block per chunk", True, {"block_size": 12, "memory_segments": 2, "fam_length": 1}),
    ("fam without feedback memory", False, {"block_size": 4, "memory_segments": 4, "fam_length": 0}),
    # documents across chunk boundaries and over several ranks, starting inside blocks and at a block start
    ("fam documents", False, {"block_size": 4, "memory_segments": 1, "fam_length": 2}, True),
    ("fam alibi documents, memory longer than a chunk", True,
     {"block_size": 6, "memory_segments": 3, "fam_length": 3}, True),
    # documents starting exactly at a chunk start (24; 12 and 36 at CP=4), one over more than three chunks
    ("fam alibi documents at chunk starts, one block per chunk", True,
     {"block_size": 12, "memory_segments": 2, "fam_length": 2}, "long"),
    ("fam documents without feedback memory", False, {"block_size": 4, "memory_segments": 4, "fam_length": 0},
     "long"),
    # no block memory: the halo is the previous rank's last segment id alone
    ("fam documents without block memory", False, {"block_size": 4, "memory_segments": 0, "fam_length": 2}, "long"),
]
REFUSED = [  # (kind, options, documents, words of the error)
    ("axial", {"axial_shape": [10, 5]}, False, "whole rows"),
]
FAM_REFUSED = [  # (options, documents, words)
    ({"block_size": 5, "memory_segments": 1, "fam_length": 2}, False, "whole blocks"),
]


def segments(kind: object = True) -> torch.Tensor:
    """Three documents per row, starting at different places in the two rows ("long": the second
    row's first document spans more than three chunks at CP=4, and a document ends at a chunk's end)."""
    pos = torch.arange(L)
    if kind == "long":
        return torch.stack([(pos >= 24).long() + (pos >= 36).long(), (pos >= 40).long() + (pos >= 41).long()])
    return torch.stack([(pos >= 7).long() + (pos >= 30).long(), (pos >= 20).long() + (pos >= 21).long()])


def check(name: str, kind: str, alibi: bool, options: dict, documents: object, layout: str = "contiguous",
          tile: int = ring_attention.TILE) -> None:
    """`tile`: ring attention's score tiles (the default covers a whole chunk at L = 48)."""
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    set_layout(layout)
    default_tile, ring_attention.TILE = ring_attention.TILE, tile
    chunk = rank_positions(r, n, L)
    module = CORE_ATTENTION[kind](attention_config(H, D), layer_number=1, alibi=alibi, **options)
    g = torch.Generator().manual_seed(1)
    heads = 2 * H if options.get("global_tokens") else H  # the local heads, then the global projection's
    full = [torch.randn(L, B, heads, D, dtype=torch.float64, generator=g) for _ in range(3)]
    weight = torch.randn(L, B, H * D, dtype=torch.float64, generator=g)
    seg = segments(documents) if documents else None

    ref_in = [x.clone().requires_grad_() for x in full]
    q, k, v = (x.permute(1, 2, 0, 3) for x in ref_in)
    ref = module.attend(q, k, v) if seg is None else module.attend_documents(q, k, v, seg)
    ref = ref.permute(2, 0, 1, 3).reshape(L, B, H * D)
    (ref * weight).sum().backward()

    mine = [x[chunk].clone().requires_grad_() for x in full]
    params = None if seg is None else DocumentSegments(segment_ids=seg[:, chunk].contiguous())
    out = module(*mine, attention_mask=None, packed_seq_params=params)
    (out * weight[chunk]).sum().backward()
    set_layout("contiguous")
    ring_attention.TILE = default_tile
    error = (out - ref[chunk]).abs().max().item()
    assert error < 1e-10, (name, "output", r, error)
    for label, a, b in zip("qkv", mine, ref_in):
        if kind == "lsh" and label == "k":  # keys are the queries: k is not used
            assert a.grad is None and b.grad is None, name
            continue
        error = (a.grad - b.grad[chunk]).abs().max().item()
        assert error < 1e-10, (name, "grad " + label, r, error)
        assert b.grad[chunk].abs().max().item() > 0, (name, "grad " + label, "all zero")


MEMORY = [("local", {"window": 16, "dilation": [1, 2]}), ("linear", {"chunk_size": 64})]


def memory(kind: str, options: dict) -> str:
    """Tracked activation memory (tests/attention/helpers.py) of a forward and backward on this
    rank's chunk of L = 2048 is about 1/N of the one-process run's on the whole sequence."""
    n = parallel_state.get_context_parallel_world_size()
    length, heads = 2048, 2
    module = CORE_ATTENTION[kind](attention_config(heads, D), layer_number=1, **options)

    def whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = module.attend(*(x.permute(1, 2, 0, 3) for x in (q, k, v)))
        return out.permute(2, 0, 1, 3).reshape(length, 1, -1)

    def chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return module(q, k, v, attention_mask=None)

    one = forward_backward_memory(whole, length, heads, D).peak
    mine = forward_backward_memory(chunk, length // n, heads, D).peak
    ratio = mine * n / one
    assert 0.75 < ratio < 1.25, (kind, "memory per rank x N / one process", ratio)
    return f"{kind} {ratio:.2f}"


class FamLayer:
    """A small FAM layer in float64 for `run_fam_layer`: projections, output projection and a
    tanh MLP (no norms), its weights the same on every rank."""

    def __init__(self, module, fam_length: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        w = H * D
        self.module = module
        self.weights = {name: (torch.randn(*shape, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
                        for name, shape in (("qkv", (w, 3 * w)), ("proj", (w, w)), ("up", (w, 2 * w)),
                                            ("down", (2 * w, w)))}
        self.fam_init = (torch.randn(fam_length, w, dtype=torch.float64, generator=g).requires_grad_()
                         if fam_length else None)

    def qkv(self, h: torch.Tensor):
        s, b = h.shape[:2]
        return (h @ self.weights["qkv"]).view(s, b, H, 3, D).unbind(3)

    def residual(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + context @ self.weights["proj"]

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(h @ self.weights["up"]) @ self.weights["down"]

    def __call__(self, x: torch.Tensor, segment_ids=None) -> torch.Tensor:
        return fam_module.run_fam_layer(x, self.fam_init, self.module, self.qkv, self.residual, self.mlp,
                                        segment_ids)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.weights.values()) + ([] if self.fam_init is None else [self.fam_init])


def one_process(function, *args):
    """`function(*args)` as one process runs it: fam.py's context-parallel branch switched off."""
    original = fam_module.context_size
    fam_module.context_size = lambda: 1
    try:
        return function(*args)
    finally:
        fam_module.context_size = original


def assert_chunk_equals(name: str, chunk: slice, out: torch.Tensor, ref: torch.Tensor, mine: torch.Tensor,
                        ref_in: torch.Tensor, params: list, ref_grads: list) -> None:
    """This rank's output and input gradient equal the one-process ones on its chunk, and the
    weights' gradients summed over the context ranks equal the one-process ones (1e-10 relative)."""
    r = parallel_state.get_context_parallel_rank()
    error = (out - ref[chunk]).abs().max().item()
    assert error < 1e-10 * max(1.0, ref.abs().max().item()), (name, "output", r, error)
    error = (mine.grad - ref_in.grad[chunk]).abs().max().item()
    assert error < 1e-10 * max(1.0, ref_in.grad.abs().max().item()), (name, "grad x", r, error)
    for i, (p, want) in enumerate(zip(params, ref_grads)):
        got = torch.zeros_like(p) if p.grad is None else p.grad.clone()  # fam_init: rank 0's only
        dist.all_reduce(got, group=parallel_state.get_context_parallel_group())
        error = (got - want).abs().max().item()
        assert error < 1e-10 * max(1.0, want.abs().max().item()), (name, "grad weight", i, r, error)


def check_fam(name: str, alibi: bool, options: dict, documents: object = False) -> None:
    """Two layers in a row (the second's memory and state come from the first's outputs): outputs,
    the gradients of the chunk's inputs and of every weight and the initial FAM (summed over the
    ranks) equal one process's, to 1e-10 of their largest magnitude (the FAM chain of L / B
    steps grows the gradients to ~1e2); `documents`: packed documents (`segments`)."""
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    C = L // n
    chunk = slice(r * C, (r + 1) * C)
    layers = [FamLayer(CORE_ATTENTION["fam"](attention_config(H, D), layer_number=i + 1, alibi=alibi, **options),
                       options["fam_length"], seed=3 + i) for i in range(2)]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(L, B, H * D, dtype=torch.float64, generator=g)
    weight = torch.randn(L, B, H * D, dtype=torch.float64, generator=g)
    params = [p for layer in layers for p in layer.parameters()]

    ref_in = x.clone().requires_grad_()
    seg = segments(documents) if documents else None
    ref = one_process(lambda h: layers[1](layers[0](h, seg), seg), ref_in)
    (ref * weight).sum().backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    mine = x[chunk].clone().requires_grad_()
    mine_seg = None if seg is None else seg[:, chunk].contiguous()
    out = layers[1](layers[0](mine, mine_seg), mine_seg)
    (out * weight[chunk]).sum().backward()
    assert_chunk_equals(name, chunk, out, ref, mine, ref_in, params, ref_grads)


def fam_refused(options: dict, documents: bool, words: str) -> None:
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    C = L // n
    layer = FamLayer(CORE_ATTENTION["fam"](attention_config(H, D), layer_number=1, **options), options["fam_length"], 1)
    x = torch.randn(C, B, H * D, dtype=torch.float64)
    seg = segments()[:, r * C:(r + 1) * C].contiguous() if documents else None
    try:
        layer(x, seg)
    except NotImplementedError as e:
        assert words in str(e) and "\n" not in str(e), (options, str(e))
    else:
        raise AssertionError(f"fam {options} at parallel.context > 1 was not refused")


def refused(kind: str, options: dict, documents: bool, words: str) -> None:
    n, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    C = L // n
    module = CORE_ATTENTION[kind](attention_config(H, D), layer_number=1, **options)
    x = torch.randn(C, B, H, D, dtype=torch.float64)
    params = None if not documents else DocumentSegments(segment_ids=segments()[:, r * C:(r + 1) * C].contiguous())
    try:
        module(x, x, x, attention_mask=None, packed_seq_params=params)
    except NotImplementedError as e:
        assert words in str(e) and "\n" not in str(e), (kind, str(e))
    else:
        raise AssertionError(f"{kind} {options} at parallel.context > 1 was not refused")


def run_cases() -> str:
    """Every case above on this job's context group; the summary line."""
    for case in CASES:
        print("case", case[0], file=sys.stderr, flush=True)
        check(*case)
    for case in FAM_CASES:
        check_fam(*case)
    for case in REFUSED:
        refused(*case)
    for fam_case in FAM_REFUSED:
        fam_refused(*fam_case)
    ratios = [memory(*case) for case in MEMORY]
    set_layout("zigzag")  # the sub-quadratic kinds need contiguous chunks
    refused("local", {"window": 4}, False, "contiguous")
    refused("linear", {}, False, "contiguous")
    set_layout("contiguous")
    return (f"context attention: {len(CASES) + len(FAM_CASES)} cases equal one process, "
            f"{len(REFUSED) + len(FAM_REFUSED) + 2} refused, at CP={dist.get_world_size()}; "
            f"activation memory per rank x N / one process: {', '.join(ratios)}")


def main() -> None:
    """This driver's cases, then grouped-query attention's (context_gqa_driver.py) in the same job."""
    import context_gqa_driver

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    lines = [run_cases(), context_gqa_driver.run_cases()]
    if dist.get_rank() == 0:
        print("\n".join(lines))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
