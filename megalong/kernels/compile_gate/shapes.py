"""The shape table: megalong's launchers driven at real sizes on `meta` tensors, forward and backward.

Shapes come from the GPT-Neo configs in configs/ (heads and hidden size: head_dim 64 for 125m,
128 for 1.3b and 2.7b), one sequence of L = 8192 tokens, bf16 and float32. Every case calls a
public launcher the way a layer of that kind calls it (in the dtype that layer hands it), then
backpropagates through it, inside `recorder.record_launches(arch)`: the launches land on the
recorder, nothing runs.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import yaml

SEQ_LEN = 8192
DTYPES = (torch.bfloat16, torch.float32)
CONFIGS = ("gpt-neo-125m", "gpt-neo-1.3b", "gpt-neo-2.7b")
EXPERTS = (8, 64)
META = torch.device("meta")


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    hidden: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def config_shapes(root: str) -> list[Shape]:
    """(heads, hidden) of each config in CONFIGS under `root`/configs."""
    from megalong.config import ConfigError

    shapes = []
    for name in CONFIGS:
        path = os.path.join(root, "configs", f"{name}.yaml")
        try:
            with open(path) as f:
                model = (yaml.safe_load(f) or {}).get("model", {})
            shapes.append(Shape(name, int(model["num_attention_heads"]), int(model["hidden_size"])))
        except OSError as error:
            raise ConfigError(f"{path}: cannot read it ({error.strerror}); the compile gate takes its "
                              "shapes from there (--root: the directory holding configs/)") from None
        except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: model.num_attention_heads and model.hidden_size must be "
                              f"integers (the compile gate reads them): {error}") from None
    return shapes


def _t(*size: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(*size, device=META, dtype=dtype, requires_grad=grad)


def _backward(*outputs: torch.Tensor) -> None:
    sum(o.float().sum() for o in outputs).backward()


def _slopes(heads: int) -> torch.Tensor:
    return _t(heads)


def _qkv(s: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_t(1, s.heads, SEQ_LEN, s.head_dim, dtype=dtype, grad=True) for _ in range(3))


def window_cases(s: Shape, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from megalong.kernels.window_attention import window_attention

    scale = s.head_dim ** -0.5
    n_global = 64
    variants = {  # name: (window, dilation, alibi, global tokens)
        "window256": (256, 1, False, False), "window1024": (1024, 1, False, False),
        "window256-dil2": (256, 2, False, False), "window256-alibi": (256, 1, True, False),
        "window256-global": (256, 1, False, True),
        "window256-global-alibi": (256, 1, True, True),
    }
    for name, (window, dilation, alibi, has_global) in variants.items():
        def case(window=window, dilation=dilation, alibi=alibi, has_global=has_global) -> None:
            q, k, v = _qkv(s, dtype)
            slopes = _slopes(s.heads) if alibi else None
            g = torch.arange(n_global, device=META) * 128 if has_global else None
            out, _ = window_attention(q, k, v, scale, window, dilation, slopes, g)
            outs = [out]
            if has_global:  # the global tokens' own rows: full causal at their positions
                rows, _ = window_attention(q[:, :, :n_global], k, v, scale, None, 1, slopes, None, g)
                outs.append(rows)
            _backward(*outs)
        yield name, case

    def global_alibi() -> None:
        q, k, v = _qkv(s, dtype)
        _backward(window_attention(q, k, v, scale, None, 1, _slopes(s.heads))[0])
    yield "global-alibi", global_alibi

    def documents(window: int | None = None, alibi: bool = False) -> None:  # packed documents (segment ids)
        q, k, v = _qkv(s, dtype)
        segments = torch.zeros(1, SEQ_LEN, device=META, dtype=torch.long)
        _backward(window_attention(q, k, v, scale, window, 1, _slopes(s.heads) if alibi else None,
                                   segment_ids=segments)[0])
    yield "global-documents", documents
    yield "window256-alibi-documents", lambda: documents(256, True)

    def grouped(window: int | None, documents: bool) -> None:  # 4 query heads per key/value head
        q = _t(1, s.heads, SEQ_LEN, s.head_dim, dtype=dtype, grad=True)
        k, v = (_t(1, s.heads // 4, SEQ_LEN, s.head_dim, dtype=dtype, grad=True) for _ in range(2))
        segments = torch.zeros(1, SEQ_LEN, device=META, dtype=torch.long) if documents else None
        _backward(window_attention(q, k, v, scale, window, 1, _slopes(s.heads), segment_ids=segments)[0])
    # grouped k/v: `per_group` is then an i32 argument, not the constexpr 1 of the cases above
    yield "window256-alibi-gqa4", lambda: grouped(256, False)
    yield "global-alibi-documents-gqa4", lambda: grouped(None, True)


def fam_cases(s: Shape, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """Plain, ALiBi, no FAM; packed documents (segment ids, the initial FAM); grouped key/value heads."""
    from megalong.kernels.fam_attention import fam_block_attention

    block, fam_len = 256, 64
    variants = {  # name: (FAM, ALiBi, documents, key/value groups)
        "fam": (True, False, False, s.heads), "fam-alibi": (True, True, False, s.heads),
        "fam-nofam": (False, False, False, s.heads), "fam-alibi-documents": (True, True, True, s.heads),
        "fam-gqa": (True, False, False, _groups(s)),
    }
    for name, (with_fam, alibi, documents, groups) in variants.items():
        def case(with_fam=with_fam, alibi=alibi, documents=documents, groups=groups) -> None:
            q = _t(1, s.heads, SEQ_LEN, s.head_dim, dtype=dtype, grad=True)
            k, v = (_t(1, groups, SEQ_LEN, s.head_dim, dtype=dtype, grad=True) for _ in range(2))
            n_blocks = SEQ_LEN // block
            kf = _t(1, groups, n_blocks, fam_len, s.head_dim, dtype=dtype, grad=True) if with_fam else None
            vf = _t(1, groups, n_blocks, fam_len, s.head_dim, dtype=dtype, grad=True) if with_fam else None
            extra = {}
            if documents:
                extra = dict(segment_ids=torch.zeros(1, SEQ_LEN, device=META, dtype=torch.long),
                             fam_docs=torch.zeros(1, n_blocks, device=META, dtype=torch.long),
                             k_init=_t(1, groups, fam_len, s.head_dim, dtype=dtype, grad=True),
                             v_init=_t(1, groups, fam_len, s.head_dim, dtype=dtype, grad=True))
            _backward(fam_block_attention(q, k, v, kf, vf, s.head_dim ** -0.5, block, 1,
                                          _slopes(s.heads) if alibi else None, **extra))
        yield name, case


def _groups(s: Shape) -> int:
    """Key/value groups of the grouped-query cases: four query heads per group."""
    return max(1, s.heads // 4)


def lsh_cases(s: Shape, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from megalong.kernels.lsh_attention import lsh_chunk_attention

    chunk = 64
    for rounds, alibi, documents in ((1, False, False), (4, False, False), (2, True, False), (2, True, True)):
        def case(rounds=rounds, alibi=alibi, documents=documents) -> None:
            size = (1, s.heads, rounds, SEQ_LEN, s.head_dim)
            sq, sk, sv = (_t(*size, dtype=dtype, grad=True) for _ in range(3))
            positions = _t(1, s.heads, rounds, SEQ_LEN, dtype=torch.int64)
            segments = torch.zeros(1, SEQ_LEN, device=META, dtype=torch.long) if documents else None
            out, lse = lsh_chunk_attention(sq, sk, sv, positions, positions, chunk, s.head_dim ** -0.5,
                                           _slopes(s.heads) if alibi else None, segments)
            _backward(out, lse)
        yield f"lsh-{rounds}rounds" + ("-alibi" if alibi else "") + ("-documents" if documents else ""), case


def linear_cases(s: Shape, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from megalong.kernels.linear_attention import linear_attention
    from megalong.kernels.tuning import linear_kernel_covers

    if not linear_kernel_covers(dtype, s.head_dim, s.head_dim):
        return  # LinearAttention runs its torch path there: nothing is launched

    def case(documents: bool = False, groups: int = s.heads) -> None:
        q = _t(1, s.heads, SEQ_LEN, s.head_dim, dtype=dtype, grad=True)  # 16-bit inputs go in as they are
        k, v = (_t(1, groups, SEQ_LEN, s.head_dim, dtype=dtype, grad=True) for _ in range(2))
        segments = torch.zeros(1, SEQ_LEN, device=META, dtype=torch.long) if documents else None
        _backward(linear_attention(q, k, v, 1e-6, 64, segments))
    yield "linear", case
    yield "linear-documents", lambda: case(documents=True)
    yield "linear-gqa", lambda: case(groups=_groups(s))


def moe_cases(s: Shape, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    """Router gating (float32 logits, as the router computes them), permute, the experts' grouped
    GEMMs (forward, input and weight gradients; `auto` backend: on sm_90 bf16 goes to
    torch._grouped_mm and launches nothing) and combine, for 8 and 64 experts."""
    from megalong.kernels.grouped_gemm import grouped_experts
    from megalong.kernels.moe import (
        combine_rows,
        permute_rows,
        rows_of_tokens,
        topk_gating,
    )

    tokens, ffn = SEQ_LEN, 4 * s.hidden
    routers = (("topk2", 2, True, False), ("topk2-bias", 2, True, True), ("switch", 1, False, False))
    for experts in EXPERTS:
        for router, top_k, renorm, bias in routers:
            def case(experts=experts, top_k=top_k, renorm=renorm, bias=bias) -> None:
                logits = _t(tokens, experts, grad=True)
                g = topk_gating(logits, top_k, renorm, _t(experts) if bias else None)
                token = _t(tokens * top_k, dtype=torch.int64)
                rows = rows_of_tokens(token, tokens, top_k)
                x = _t(tokens, s.hidden, dtype=dtype, grad=True)
                w1 = _t(experts, s.hidden, ffn, dtype=dtype, grad=True)
                w2 = _t(experts, ffn, s.hidden, dtype=dtype, grad=True)
                y = permute_rows(x, token, rows)
                h = grouped_experts(y, _t(experts, dtype=torch.int64), w1, w2, None, torch.nn.functional.gelu)
                gate = g.gates.reshape(-1).to(dtype)
                _backward(combine_rows(h, gate, token, rows), g.probs)
            yield f"moe{experts}-{router}", case


FAMILIES = (window_cases, fam_cases, lsh_cases, linear_cases, moe_cases)


def all_cases(root: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(case name, a function that drives the launchers) for every family, shape and dtype."""
    for shape in config_shapes(root):
        for dtype in DTYPES:
            for family in FAMILIES:
                for name, case in family(shape, dtype):
                    yield f"{shape.name}/{str(dtype).replace('torch.', '')}/{name}", case
