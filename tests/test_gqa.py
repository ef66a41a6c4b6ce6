"""Grouped-query attention (`model.num_query_groups`): a model whose key/value heads are grouped
equals, in float64, the multi-head model whose key/value weights are those groups' duplicated for
every query head of the group, for every attention kind that supports groups (lsh is refused by
name), with ALiBi; megalong's Hugging Face class computes the same. TP=2 and PP=2 with groups:
tests/test_import.py (GQA Mistral and Qwen2 imports loaded at TP=2 and PP=2)."""
from __future__ import annotations

import pytest
import torch

from megalong.config import ConfigError, config_from_dict, validate
from megalong.export.qkv import fuse_qkv, split_qkv
from megalong.parallel.distributed import shutdown

HEADS, GROUPS, HEAD_DIM, SEQ, VOCAB = 4, 2, 8, 16, 64
CASES = {
    "global": ("global", {}, {}),
    "global_alibi": ("global", {}, {"alibi": True, "position_embedding": "none"}),
    "local_dilated_alibi": ("local", {"window": 3, "dilation": [1, 2, 1, 3]},
                            {"alibi": True, "position_embedding": "none"}),
    "local_global_tokens": ("local", {"window": 3, "global_tokens": 2}, {}),
    "linear": ("linear", {"chunk_size": 4}, {}),
    "linear_efficient": ("linear", {"chunk_size": 4, "normalization": "efficient"}, {}),
    "axial": ("axial", {"axial_shape": [4, 4]}, {}),
    "fam": ("fam", {"block_size": 4, "memory_segments": 1, "fam_length": 2}, {}),
    "rope_swiglu": ("global", {}, {"position_embedding": "rope", "activation": "swiglu", "normalization": "RMSNorm"}),
}


def config(case: str, groups) -> "Config":  # noqa: F821
    kind, options, extra = CASES[case]
    model = {"num_layers": 2, "hidden_size": HEADS * HEAD_DIM, "num_attention_heads": HEADS,
             "num_query_groups": groups, "max_position_embeddings": SEQ, "attention_layers": [[[kind], 2]],
             "attention": {kind: options} if options else {}, "vocab_size": VOCAB,
             "make_vocab_size_divisible_by": 1, **extra}
    return config_from_dict({"model": model, "data": {"seq_length": SEQ}})


def duplicated_kv(state: dict, names: list[str]) -> dict:
    """The multi-head state with each group's key/value rows repeated for its query heads."""
    out = dict(state)
    per_group = HEADS // GROUPS
    for name in names:
        q, k, v = split_qkv(state[name], HEADS, GROUPS)
        k, v = (x.reshape(GROUPS, 1, HEAD_DIM, *x.shape[1:]).expand(-1, per_group, *([-1] * x.ndim))
                .reshape(HEADS * HEAD_DIM, *x.shape[1:]) for x in (k, v))
        out[name] = fuse_qkv(q, k, v, HEADS, HEADS)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_kv_equals_multi_head_with_duplicated_kv(case):
    from megalong.export.modeling import MegalongConfig, MegalongForCausalLM
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize

    grouped_cfg, mha_cfg = config(case, GROUPS), config(case, None)
    validate(grouped_cfg, check_paths=False)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, SEQ)
    try:
        initialize(1)
        torch.manual_seed(0)
        grouped = build_model(grouped_cfg, VOCAB).double().eval()
        mha = build_model(mha_cfg, VOCAB).double().eval()
        state = {k: v for k, v in grouped.state_dict().items() if not k.endswith("_extra_state")}
        qkv = [k for k in state if "linear_qkv" in k and state[k].shape[0] == (HEADS + 2 * GROUPS) * HEAD_DIM]
        assert qkv and state[qkv[0]].shape[0] < mha.state_dict()[qkv[0]].shape[0]  # grouped: fewer k/v rows
        result = mha.load_state_dict(duplicated_kv(state, qkv), strict=False)
        assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
        with torch.no_grad():
            ours, theirs = grouped(tokens, positions, None), mha(tokens, positions, None)
    finally:
        shutdown()
    assert (ours - theirs).abs().max().item() < 1e-10
    assert (ours - theirs.roll(1, dims=-1)).abs().max().item() > 1e-3  # the comparison can fail

    hf = MegalongForCausalLM(MegalongConfig(megalong_model=grouped_cfg.to_dict()["model"], vocab_size=VOCAB))
    hf.load_state_dict(state, strict=True)
    with torch.no_grad():
        exported = hf.double().eval()(tokens).logits
        cached = hf.generate(tokens[:1, :6], max_new_tokens=6, do_sample=False)
        uncached = hf.generate(tokens[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
    assert (exported - ours).abs().max().item() < 1e-10
    assert torch.equal(cached, uncached)


DOCUMENT_CASES = {  # layers of several kinds, run on packed documents
    "local_linear_axial_fam": (["local", "linear", "axial", "fam"],
                               {"local": {"window": 3, "dilation": [1, 2, 1, 3], "global_tokens": 2},
                                "linear": {"chunk_size": 4}, "axial": {"axial_shape": [4, 4]},
                                "fam": {"block_size": 4, "memory_segments": 1, "fam_length": 2}}),
    "local_linear_efficient": (["local", "linear"], {"local": {"window": 3, "dilation": 2},
                                                      "linear": {"chunk_size": 4, "normalization": "efficient"}}),
}


def _documents_config(case: str, groups):
    kinds, options = DOCUMENT_CASES[case]
    model = {"num_layers": len(kinds), "hidden_size": HEADS * HEAD_DIM, "num_attention_heads": HEADS,
             "num_query_groups": groups, "max_position_embeddings": SEQ, "attention_layers": [[kinds, 1]],
             "attention": options, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 1}
    return config_from_dict({"model": model, "data": {"seq_length": SEQ}})


@pytest.mark.parametrize("case", sorted(DOCUMENT_CASES))
def test_grouped_kv_with_packed_documents_equals_multi_head_loss_and_gradients(case):
    """Packed documents (segment ids reaching every layer), float64: the grouped model's per-token
    loss is the duplicated multi-head model's, and so are its weight gradients, a group's key and
    value rows receiving the sum of its query heads' duplicated rows' gradients."""
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize
    from megalong.train.documents import DocumentBatching, model_inputs

    grouped_cfg, mha_cfg = _documents_config(case, GROUPS), _documents_config(case, None)
    validate(grouped_cfg, check_paths=False)
    full = torch.randint(3, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    full[0, [5, 6, 11]] = 2  # EOD: a one-token document, ragged ends
    full[1, 9] = 2
    batch = {"tokens": full[:, :-1], "labels": full[:, 1:], "loss_mask": torch.ones(2, SEQ)}
    batch = DocumentBatching(2, document_mask=True, reset_position_ids=True).apply(batch)
    tokens, positions, kwargs = model_inputs(batch)
    try:
        initialize(1)
        torch.manual_seed(0)
        grouped = build_model(grouped_cfg, VOCAB).double().eval()  # eval: no dropout; gradients still flow
        mha = build_model(mha_cfg, VOCAB).double().eval()
        state = {k: v for k, v in grouped.state_dict().items() if not k.endswith("_extra_state")}
        qkv = [k for k in state if "linear_qkv" in k and state[k].shape[0] == (HEADS + 2 * GROUPS) * HEAD_DIM]
        mha.load_state_dict(duplicated_kv(state, qkv), strict=False)
        ours = grouped(tokens, positions, None, labels=batch["labels"], **kwargs)
        theirs = mha(tokens, positions, None, labels=batch["labels"], **kwargs)
        names = [n for n, _ in grouped.named_parameters()]
        ours_g = dict(zip(names, torch.autograd.grad(ours.sum(), list(grouped.parameters()), allow_unused=True)))
        mha_params = dict(mha.named_parameters())
        theirs_g = dict(zip(names, torch.autograd.grad(theirs.sum(), [mha_params[n] for n in names],
                                                       allow_unused=True)))
    finally:
        shutdown()
    assert (ours - theirs).abs().max().item() < 1e-10
    per_group = HEADS // GROUPS
    compared = 0
    for name in names:
        a, b = ours_g[name], theirs_g[name]
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        if name in qkv:
            qa, ka, va = split_qkv(a, HEADS, GROUPS)
            qb, kb, vb = split_qkv(b, HEADS, HEADS)
            kb, vb = (x.reshape(GROUPS, per_group, HEAD_DIM, *x.shape[1:]).sum(1).reshape(ka.shape) for x in (kb, vb))
            a, b = torch.cat([qa, ka, va]), torch.cat([qb, kb, vb])
        assert (a - b).abs().max().item() < 1e-10, name
        compared += 1
    assert compared >= len(qkv) > 0
    assert any("linear_qkv_global" in n for n in qkv) == (case == "local_linear_axial_fam")


def test_groups_are_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match="model.num_query_groups: lsh layers share queries and keys"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 2,
                                             "attention_layers": [[["lsh"], 2]]}}), check_paths=False)
    with pytest.raises(ConfigError, match="model.num_query_groups: 3 groups do not divide model.num_attention_heads 4"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 3}}), check_paths=False)
    with pytest.raises(ConfigError, match="parallel.tensor: 2 does not divide model.num_query_groups 1"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 1},
                                   "parallel": {"tensor": 2}}), check_paths=False, world_size=2)


MEMORY = {  # kind, options, alibi, documents
    "global": ("global", {}, False, False),
    "global_alibi": ("global", {}, True, False),
    "global_documents": ("global", {}, False, True),
    "local_dilated_alibi": ("local", {"window": 8, "dilation": [1, 2, 1, 2, 3, 3, 1, 1]}, True, False),
    "local_global_tokens_documents": ("local", {"window": 8, "global_tokens": 4}, False, True),
    "linear": ("linear", {"chunk_size": 16}, False, False),
    "linear_efficient": ("linear", {"chunk_size": 16, "normalization": "efficient"}, False, False),
    "linear_documents": ("linear", {"chunk_size": 16}, False, True),
    "linear_efficient_documents": ("linear", {"chunk_size": 16, "normalization": "efficient"}, False, True),
    "axial_alibi": ("axial", {"axial_shape": [8, 16]}, True, False),
    "axial_documents": ("axial", {"axial_shape": [8, 16]}, False, True),
    "fam": ("fam", {"block_size": 16, "memory_segments": 1, "fam_length": 4}, False, False),
    "fam_alibi_documents": ("fam", {"block_size": 16, "memory_segments": 1, "fam_length": 4}, True, True),
}
MEM_L, MEM_HEADS, MEM_D = 128, 8, 16


def _attention_memory(case: str, groups: int, copy: bool) -> int:
    """Peak tracked bytes of one forward + backward of the kind's core attention on q [L, b, 8, d]
    and k, v [L, b, groups, d] made outside the tracker (global tokens: twice the heads and groups,
    the local then the global projections'); `copy`: k and v repeated per query head inside the
    tracker first (what the base class does for a kind with grouped_kv False). fam runs its block
    attention (`blocks`, FAM keys and values of the groups made outside too)."""
    from attention.helpers import MemoryTracker, attention_config

    from megalong.attention.base import per_query_head
    from megalong.attention.registry import CORE_ATTENTION
    from megalong.attention.segments import DocumentSegments

    kind, options, alibi, documents = MEMORY[case]
    L, b, heads, d = MEM_L, 1, MEM_HEADS, MEM_D
    cls = CORE_ATTENTION[kind]
    module = cls(attention_config(heads, d), 1, alibi=alibi, options=cls.options_class(**options))
    sets = 2 if options.get("global_tokens") else 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, b, sets * heads, d, generator=g, requires_grad=True)
    k, v = (torch.randn(L, b, sets * groups, d, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(L, b, heads * d, generator=g)  # global tokens: the local heads' output
    seg = (torch.arange(L) // 40).expand(b, L).contiguous()
    tracker = MemoryTracker()
    if kind == "fam":
        from megalong.attention.fam import FamDocuments

        n, fam_len = -(-L // options["block_size"]), options["fam_length"]
        k_fam, v_fam = (torch.randn(b, groups, n, fam_len, d, generator=g, requires_grad=True) for _ in range(2))
        k_init, v_init = (torch.randn(b, groups, fam_len, d, generator=g) for _ in range(2))
        qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        with tracker:
            if copy:
                kh, vh, k_fam, v_fam = (per_query_head(x, heads) for x in (kh, vh, k_fam, v_fam))
                k_init, v_init = per_query_head(k_init, heads), per_query_head(v_init, heads)
            docs = None
            if documents:
                ends = (torch.arange(1, n + 1) * options["block_size"]).clamp(max=L) - 1
                docs = FamDocuments(seg, torch.cat([seg[:, :1], seg[:, ends][:, :-1]], dim=1), k_init, v_init)
            out = module.blocks(qh, kh, vh, k_fam, v_fam, docs)
            out.permute(2, 0, 1, 3).reshape(L, b, -1).backward(grad)
        return tracker.peak
    module.grouped_kv = not copy
    with tracker:
        module(q, k, v, packed_seq_params=DocumentSegments(segment_ids=seg) if documents else None).backward(grad)
    return tracker.peak


@pytest.mark.parametrize("case", sorted(MEMORY))
def test_attention_never_copies_kv_per_query_head(case):
    """Tracked allocations: with one key/value group for 8 query heads, each kind's forward +
    backward peaks no higher than multi-head attention's (8 groups: its k and v, and whatever the
    kind derives from them, per query head), and at least the bytes of a per-query-head copy of k
    and v below the same module made to copy them (grouped_kv False, what repeat_interleave in
    the base class did), so the measurement can fail."""
    sets = 2 if MEMORY[case][1].get("global_tokens") else 1
    copy_bytes = 2 * MEM_L * sets * (MEM_HEADS - 1) * MEM_D * 4
    mha = _attention_memory(case, MEM_HEADS, False)
    grouped = _attention_memory(case, 1, False)
    copied = _attention_memory(case, 1, True)
    assert grouped <= mha, (grouped, mha)
    assert copied >= grouped + copy_bytes, (copied, grouped, copy_bytes)
