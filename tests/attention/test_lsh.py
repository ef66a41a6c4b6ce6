"""`lsh` (Reformer) against a naive reference that follows the paper, in float64, forward and
gradients, with ALiBi; the hashing's rotations and buckets."""
import pytest
import torch

from attention.helpers import (
    alibi_reference_bias,
    assert_close_with_grads,
    attention_config,
    randn,
    tp,
)
from megalong.attention.alibi import alibi_slopes
from megalong.attention.lsh import LshAttention
from megalong.attention.reference import explicit_mask, reference_attention

TOL = 1e-9


def naive_lsh(q, v, module, slopes=None, segments=None):
    """Reformer's multi-round LSH attention written out: per round, hashes from the module's
    rotations, a Python sort by (bucket, position), the L x L mask of 'same chunk or the chunk
    before, not later in the text' (and, with `segments` [b, L], 'same document'), the paper's
    self penalty (1e5) and duplicate count log N_ij; rounds combined by softmax over their
    log-sum-exps. Returns the output and the round masks."""
    b, h, L, d = q.shape
    c, n = module.bucket_size, module.n_hashes
    chunks = -(-L // c)
    n_buckets = module.n_buckets or (1 if chunks == 1 else chunks + chunks % 2)
    k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    rotations = module.rotations(n_buckets, d) if n_buckets > 1 else None
    out = torch.zeros_like(q)
    all_masks = []
    for bi in range(b):
        doc = [0] * L if segments is None else segments[bi].tolist()
        for hi in range(h):
            masks = []
            for r in range(n):
                if n_buckets == 1:
                    buckets = [0] * L
                else:
                    x = q[bi, hi] @ rotations[hi, r]
                    buckets = [int(torch.argmax(torch.cat([x[i], -x[i]]))) for i in range(L)]
                order = sorted(range(L), key=lambda i: (buckets[i], i))
                chunk = {token: place // c for place, token in enumerate(order)}
                masks.append(explicit_mask(L, lambda i, j: j <= i and chunk[j] in (chunk[i], chunk[i] - 1)
                                           and doc[i] == doc[j]))
            times = sum(m.double() for m in masks)
            scores = q[bi, hi] @ k[bi, hi].T * module.scale
            if slopes is not None:
                scores = scores + torch.tensor([[-float(slopes[hi]) * (i - j) for j in range(L)]
                                                for i in range(L)], dtype=q.dtype)
            scores = scores - torch.log(times.clamp(min=1))
            scores = torch.where(torch.eye(L, dtype=torch.bool), scores - 1e5, scores)
            lses, outs = [], []
            for m in masks:
                s = scores.masked_fill(~m, float("-inf"))
                lses.append(torch.logsumexp(s, -1))
                outs.append(torch.softmax(s, -1) @ v[bi, hi])
            weights = torch.softmax(torch.stack(lses), 0).unsqueeze(-1)
            out[bi, hi] = (weights * torch.stack(outs)).sum(0)
            all_masks.append(masks)
    return out, all_masks


@pytest.mark.parametrize("L,bucket,n_hashes,alibi,heads,n_buckets", [
    (16, 4, 1, False, 2, None), (16, 4, 2, False, 2, None), (16, 4, 3, True, 4, None),
    (12, 3, 2, False, 2, None), (24, 4, 4, True, 3, None), (10, 4, 2, False, 2, None),  # 10: padded
    (16, 4, 2, False, 2, 2), (12, 4, 2, True, 2, 6), (10, 4, 2, False, 2, 8)])  # n_buckets fixed
def test_lsh_equals_naive_reference(L, bucket, n_hashes, alibi, heads, n_buckets):
    module = LshAttention(attention_config(heads), 3, n_hashes=n_hashes, bucket_size=bucket, seed=7, alibi=alibi,
                          n_buckets=n_buckets).double()
    q, v = randn(2, heads, L, 8, seed=1), randn(2, heads, L, 8, seed=2)
    out = module.attend(q, q, v)
    ref, masks = naive_lsh(q, v, module, alibi_slopes(heads) if alibi else None)
    assert_close_with_grads(out, ref, (q, v), TOL)
    # The rounds really differ (else n_hashes would be a no-op) and restrict attention (not O(L^2)).
    union = torch.stack([torch.stack(m).any(0) for m in masks])
    if n_hashes > 1:
        assert any(not torch.equal(m[0], m[1]) for m in masks)
    assert union.sum() < union.shape[0] * L * (L + 1) // 2  # some earlier tokens are not seen
    # Duplicates counted once: the result is the softmax over the union of the rounds' keys.
    if not alibi:
        k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        for idx in range(union.shape[0]):
            bi, hi = divmod(idx, heads)
            mask = union[idx] & ~torch.eye(L, dtype=torch.bool)
            mask[mask.sum(-1) == 0] |= torch.eye(L, dtype=torch.bool)[mask.sum(-1) == 0]
            want = reference_attention(q[bi, hi], k[bi, hi], v[bi, hi], mask, module.scale)
            assert (out[bi, hi] - want).abs().max().item() < TOL


@pytest.mark.parametrize("alibi", [False, True])
def test_lsh_with_one_bucket_is_causal_attention_with_self_penalty(alibi):
    L, heads = 9, 4
    module = LshAttention(attention_config(heads), 1, n_hashes=2, bucket_size=L, alibi=alibi).double()
    q, v = randn(1, heads, L, 8, seed=3), randn(1, heads, L, 8, seed=4)
    k = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    # A token sees every earlier token but not itself; the first token sees only itself.
    mask = explicit_mask(L, lambda i, j: j < i or i == j == 0)
    bias = alibi_reference_bias(heads, L) if alibi else None
    ref = reference_attention(q, k, v, mask, module.scale, bias)
    assert_close_with_grads(module.attend(q, q, v), ref, (q, v), TOL)


def test_lsh_fixed_n_buckets_hashes_a_token_alike_at_every_length():
    """With n_buckets set, a token's buckets do not depend on the sequence length (training at 16,
    generating or evaluating at 8 or 24); without it they are the chunk count's and do."""
    heads = 2
    q = randn(1, heads, 24, 8, seed=8)
    fixed = LshAttention(attention_config(heads), 1, n_hashes=2, bucket_size=4, seed=5, n_buckets=4).double()
    by_length = LshAttention(attention_config(heads), 1, n_hashes=2, bucket_size=4, seed=5).double()
    for L in (8, 16, 24):
        assert fixed.buckets_for(L) == 4
        assert torch.equal(fixed.hash(q[:, :, :L], fixed.buckets_for(L)),
                           fixed.hash(q, fixed.buckets_for(24))[..., :L])
    assert [by_length.buckets_for(L) for L in (8, 16, 24)] == [2, 4, 6]
    assert not torch.equal(by_length.hash(q[:, :, :8], by_length.buckets_for(8)),
                           by_length.hash(q, by_length.buckets_for(24))[..., :8])
    # At the length it was fixed from, the option changes nothing.
    v = randn(1, heads, 16, 8, seed=9)
    assert torch.equal(fixed.attend(q[:, :, :16], None, v), by_length.attend(q[:, :, :16], None, v))


def test_lsh_rotations_are_reproducible_and_follow_the_global_head():
    heads, L = 4, 16
    q, v = randn(1, heads, L, 8, seed=5), randn(1, heads, L, 8, seed=6)
    full = LshAttention(attention_config(heads), 2, n_hashes=2, bucket_size=4, seed=1).double()
    again = LshAttention(attention_config(heads), 2, n_hashes=2, bucket_size=4, seed=1).double()
    out = full.attend(q, q, v)
    assert torch.equal(out, again.attend(q, q, v)) and torch.equal(out, full.attend(q, q, v))
    other_seed = LshAttention(attention_config(heads), 2, n_hashes=2, bucket_size=4, seed=2).double()
    other_layer = LshAttention(attention_config(heads), 3, n_hashes=2, bucket_size=4, seed=1).double()
    assert not torch.equal(full.rotations(4, 8), other_seed.rotations(4, 8))
    assert not torch.equal(full.rotations(4, 8), other_layer.rotations(4, 8))
    halves = []
    for rank in range(2):
        part = LshAttention(attention_config(heads), 2, n_hashes=2, bucket_size=4, seed=1,
                            pg_collection=tp(rank, 2)).double()
        assert torch.equal(part.rotations(4, 8), full.rotations(4, 8)[2 * rank: 2 * rank + 2])
        halves.append(part.attend(q[:, 2 * rank: 2 * rank + 2], None, v[:, 2 * rank: 2 * rank + 2]))
    assert torch.equal(torch.cat(halves, dim=1), out)


@pytest.mark.parametrize("L,bucket,n_hashes,alibi,n_buckets", [
    (16, 4, 2, False, None), (19, 4, 3, True, None), (12, 3, 2, False, 6)])
def test_lsh_masks_cross_document_pairs_in_every_round(L, bucket, n_hashes, alibi, n_buckets):
    """Packed documents: the naive rounds with 'same document' added to every round's mask; a
    one-token document (it sees only itself), boundaries inside chunks, a padded length."""
    from megalong.attention.segments import DocumentSegments

    heads = 2
    module = LshAttention(attention_config(heads), 3, n_hashes=n_hashes, bucket_size=bucket, seed=7, alibi=alibi,
                          n_buckets=n_buckets).double()
    lengths = [[1, L - 8, 7], [L // 2, 1, L - L // 2 - 1]]
    segments = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    q, v = randn(2, heads, L, 8, seed=1), randn(2, heads, L, 8, seed=2)
    out = module.attend_documents(q, q, v, segments)
    ref, _ = naive_lsh(q, v, module, alibi_slopes(heads) if alibi else None, segments)
    assert_close_with_grads(out, ref, (q, v), TOL)
    assert (module.attend(q, q, v) - ref).abs().max() > 1e-3  # the documents do meet without the mask
    # Through the contract: megatron's [s, b, h, d] layout with DocumentSegments.
    sbhd = [x.permute(2, 0, 1, 3) for x in (q, q, v)]
    through = module(*sbhd, packed_seq_params=DocumentSegments(segment_ids=segments))
    assert (through - ref.permute(2, 0, 1, 3).flatten(2)).abs().max() < TOL
