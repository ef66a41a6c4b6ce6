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


def test_groups_are_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match="model.num_query_groups: lsh layers share queries and keys"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 2,
                                             "attention_layers": [[["lsh"], 2]]}}), check_paths=False)
    with pytest.raises(ConfigError, match="model.num_query_groups: 3 groups do not divide model.num_attention_heads 4"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 3}}), check_paths=False)
    with pytest.raises(ConfigError, match="parallel.tensor: 2 does not divide model.num_query_groups 1"):
        validate(config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 1},
                                   "parallel": {"tensor": 2}}), check_paths=False, world_size=2)


def _global_attention_memory(grouped_kv: bool, groups: int, alibi: bool, documents: bool) -> int:
    """Peak tracked bytes of one forward + backward of global attention's core module on q
    [L, b, 8, d] and k, v [L, b, groups, d] made outside the tracker."""
    from attention.helpers import MemoryTracker, attention_config

    from megalong.attention.global_attention import GlobalAttention
    from megalong.attention.segments import DocumentSegments

    L, b, heads, d = 128, 1, 8, 16
    module = GlobalAttention(attention_config(heads, d), 1, alibi=alibi)
    module.grouped_kv = grouped_kv
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, b, heads, d, generator=g, requires_grad=True)
    k, v = (torch.randn(L, b, groups, d, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(L, b, heads * d, generator=g)
    segments = DocumentSegments(segment_ids=(torch.arange(L) // 40).expand(b, L).contiguous()) if documents else None
    tracker = MemoryTracker()
    with tracker:
        module(q, k, v, packed_seq_params=segments).backward(grad)
    return tracker.peak


@pytest.mark.parametrize("alibi,documents", [(False, False), (True, False), (False, True)])
def test_global_attention_never_copies_kv_per_query_head(alibi, documents):
    """Tracked allocations: with one key/value group for 8 query heads, global attention's forward
    + backward peaks no higher than multi-head attention's (a per-query-head copy of k and v
    would add 2 * L * heads * d floats, kept for backward); the same module made to copy them
    (grouped_kv False, what the other kinds do) does exceed it, so the measurement can fail."""
    copy_bytes = 2 * 128 * 8 * 16 * 4
    mha = _global_attention_memory(True, 8, alibi, documents)
    grouped = _global_attention_memory(True, 1, alibi, documents)
    copied = _global_attention_memory(False, 1, alibi, documents)
    assert grouped <= mha, (grouped, mha)
    assert copied >= grouped + copy_bytes, (copied, grouped)
