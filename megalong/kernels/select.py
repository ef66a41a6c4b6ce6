"""Kernel selection, and the attention kinds' `attend` written on the Triton kernels.

`execution.kernels: auto` (the default) runs a kernel when its tensors are on CUDA, Triton imports and
the kernel covers the case (no attention dropout, supported shapes); `reference` always runs the
torch path. The mode is process-wide: the model builder calls `set_mode(config.execution.kernels)`.

An attention module uses a kernel with one additive line at the top of its `attend`:

    if kernels.use_kernels(q, dropout=self.active_dropout):
        return kernels.local_attend(self, q, k, v)      # or linear_attend / lsh_attend / global_alibi_attend

`fam` does the same at the top of `FamAttention.blocks`, with `fam_blocks_attend(self, q, k, v, k_fam, v_fam)`.

Each `*_attend(attn, q, k, v)` computes exactly what the module's own `attend` computes (tests
compare them), reading the module's settings (window, dilations, global positions, slopes, ...).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

MODES = ("auto", "reference")
_mode = "auto"


def set_mode(mode: str) -> None:
    """`auto` or `reference` (config key `execution.kernels`)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"execution.kernels: '{mode}' is not one of {', '.join(MODES)}")
    _mode = mode


def get_mode() -> str:
    return _mode


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_kernels(*tensors: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether the Triton path should run for these tensors."""
    return (_mode == "auto" and dropout == 0.0 and all(t.is_cuda for t in tensors)
            and triton_available())


def _eager(fn):
    """Entry points that launch Triton kernels run eagerly inside a torch.compile'd layer
    (`execution.compile`): dynamo stops its graph before them and resumes after, instead of tracing the
    launches (the kernels are fused already; tracing them is what fails, e.g. under the interpreter)."""
    return torch.compiler.disable(fn, recursive=True)


# ---- attention kinds on the kernels -----------------------------------------------------------

@_eager
def local_attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`LocalAttention.attend` on the windowed kernel: one call per dilation group (with the global
    tokens' keys), and one for the global tokens' rows (their own projections, full causal)."""
    from megalong.kernels.window_attention import window_attention

    (q, k, v), (qg, kg, vg), g = attn.split_global_heads(q, k, v)
    slopes = attn.alibi_slopes(q.device, torch.float32) if attn.alibi else None
    groups = attn.dilation_groups
    out = torch.empty_like(q) if len(groups) > 1 else None
    for d, heads in groups.items():
        idx = torch.tensor(heads, device=q.device)
        sub = (q, k, v, slopes) if len(groups) == 1 else \
            (q[:, idx], k[:, idx], v[:, idx], None if slopes is None else slopes[idx])
        part, _ = window_attention(sub[0], sub[1], sub[2], attn.scale, attn.window, d, sub[3],
                                   g if len(g) else None)
        out = part if out is None else out.index_copy(1, idx, part)
    if len(g):
        rows, _ = window_attention(qg[:, :, g], kg, vg, attn.scale, None, 1, slopes, None, g)
        out = out.index_copy(2, g, rows)
    return out


@_eager
def global_alibi_attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`GlobalAttention.attend` with ALiBi, without its L x L bias tensor (plain causal attention
    stays on SDPA's flash kernel)."""
    from megalong.kernels.window_attention import window_attention

    slopes = attn.alibi_slopes(q.device, torch.float32) if attn.alibi else None
    return window_attention(q, k, v, attn.scale, None, 1, slopes)[0]


@_eager
def fam_blocks_attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_fam: Optional[torch.Tensor], v_fam: Optional[torch.Tensor]) -> torch.Tensor:
    """`FamAttention.blocks` (block tokens over memory blocks, F_{t-1} and their own block) on the
    FAM block kernel; the FAM chain's `fam_step` stays in torch."""
    from megalong.kernels.fam_attention import fam_block_attention

    slopes = attn.alibi_slopes(q.device, torch.float32) if attn.alibi else None
    return fam_block_attention(q, k, v, k_fam, v_fam, attn.scale, attn.block_size, attn.memory_segments,
                               slopes)


@_eager
def linear_attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """`LinearAttention.attend` (normalization elu) on the chunked kernel; None for `efficient`,
    which has no kernel (the caller keeps its torch path)."""
    if attn.normalization != "elu":
        return None
    from megalong.kernels.linear_attention import linear_attention

    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn.eps, attn.chunk_size)
    return out.to(v.dtype)


@_eager
def lsh_attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """`LshAttention.attend` with its chunk attention on the kernel: hashing, sorting and the
    rounds' log-sum-exp combination stay in torch. None when bucket_size is not a power of
    two >= 16 (the caller keeps its torch path)."""
    import torch.nn.functional as F

    from megalong.kernels.lsh_attention import lsh_chunk_attention

    c = attn.bucket_size
    if c < 16 or c & (c - 1):
        return None
    b, h, L, d = q.shape
    n_chunks = -(-L // c)
    Lp = n_chunks * c
    nb = attn.buckets_for(L)
    n = attn.n_hashes
    buckets = attn.hash(q, nb)
    if Lp > L:
        q, v = F.pad(q, (0, 0, 0, Lp - L)), F.pad(v, (0, 0, 0, Lp - L))
        buckets = F.pad(buckets, (0, Lp - L), value=nb)
    keys = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    pos = torch.arange(Lp, device=q.device)
    order = torch.argsort(buckets * Lp + pos, dim=-1)
    chunk_of = torch.empty_like(order).scatter_(-1, order, (pos // c).expand_as(order))

    def sort(x: torch.Tensor) -> torch.Tensor:
        idx = order.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
        return x.unsqueeze(2).expand(-1, -1, n, -1, -1).gather(3, idx)

    slopes = attn.alibi_slopes(q.device, torch.float32) if attn.alibi else None
    out, lse = lsh_chunk_attention(sort(q), sort(keys), sort(v), order, chunk_of, c, attn.scale, slopes)
    undo = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
    out = out.gather(3, undo.unsqueeze(-1).expand(-1, -1, -1, -1, d))
    lse = lse.gather(3, undo)
    weights = torch.softmax(lse, dim=2).to(out.dtype).unsqueeze(-1)
    return (out * weights).sum(dim=2)[:, :, :L]


# ---- MoE on the kernels ------------------------------------------------------------------------

@_eager
def topk_route(router: Any, x: torch.Tensor) -> Optional[Any]:
    """`TopKRouter.forward` (topk and switch routers) with the fused gating kernel; None for a
    float64 router (`router_dtype: fp64`), which keeps its torch path. Like the router, it runs
    with autocast off (float32 logits also under `execution.precision: bf16`)."""
    from megalong.moe.router import in_router_dtype

    if router.dtype != torch.float32:
        return None
    return in_router_dtype(_topk_route)(router, x)


def _topk_route(router: Any, x: torch.Tensor) -> Any:
    import torch.nn.functional as F

    from megalong.kernels.moe import topk_gating
    from megalong.moe.losses import router_z_loss
    from megalong.moe.router import Routing, apply_capacity, expert_capacity

    o = router.options
    logits = F.linear(x.float(), router.weight.float())
    bias = router.expert_bias.float() if o.bias_update_rate else None
    g = topk_gating(logits, router.top_k, router.renormalize, bias)
    if o.bias_update_rate and router.training:
        counts = g.counts.double()
        router.step_load = counts if router.step_load is None else router.step_load + counts
    capacity = None if o.dropless else expert_capacity(x.shape[0], router.top_k, o.num_experts, o.capacity_factor)
    # Switch's balance loss N * sum_i f_i P_i, with f from the kernel's counts.
    balance = o.num_experts * (g.counts.to(g.probs.dtype) / g.expert_index.numel() * g.probs.mean(0)).sum()
    aux = o.aux_loss_coeff * balance
    if o.z_loss_coeff:
        aux = aux + o.z_loss_coeff * router_z_loss(logits)
    return Routing(g.expert_index, g.gates.to(x.dtype),
                   apply_capacity(g.expert_index, o.num_experts, capacity), aux, g.counts)


@_eager
def moe_experts(experts: Any, x: torch.Tensor, dispatch: Any, top_k: int) -> torch.Tensor:
    """Permute, run `Experts` as grouped GEMMs, and combine with the gates: what
    `unpermute(experts(permute(x, d), d.tokens_per_expert), d, T)` computes (single expert-parallel
    rank; top_k: the most experts a token goes to)."""
    from megalong.kernels.grouped_gemm import grouped_experts
    from megalong.kernels.moe import combine_rows, permute_rows, rows_of_tokens

    T = x.shape[0]
    rows = rows_of_tokens(dispatch.token, T, top_k)
    y = permute_rows(x, dispatch.token, rows)
    y = grouped_experts(y, dispatch.tokens_per_expert, experts.w1, experts.w2,
                        getattr(experts, "w3", None) if experts.gated else None, experts.activation)
    return combine_rows(y, dispatch.gate, dispatch.token, rows)
