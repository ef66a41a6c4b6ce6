"""`fam` (TransformerFAM) against a per-block loop that follows the paper, in float64, forward and
gradients, with ALiBi; the feedback memory across blocks."""
import pytest
import torch
import torch.nn.functional as F

from attention.helpers import (
    assert_close_with_grads,
    attention_config,
    randn,
    small_model,
)
from megalong.attention.alibi import alibi_slopes
from megalong.attention.fam import FamAttention
from megalong.attention.reference import explicit_mask, reference_attention

TOL = 1e-9
KERNEL_TOL = 1e-5  # the FAM block kernel's float32 gradient accumulators


def _fam_layer_parts(layer):
    """The megatron FAM layer's weights as plain functions, for the per-block reference."""
    attn = layer.self_attention
    heads, d = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head

    def qkv(h):
        s, b, _ = h.shape
        return F.linear(layer.input_layernorm(h), attn.linear_qkv.weight).view(s, b, heads, 3, d).unbind(3)

    def proj(ctx):
        return F.linear(ctx, attn.linear_proj.weight, attn.linear_proj.bias)

    def mlp(h):
        h = layer.pre_mlp_layernorm(h)
        h = F.gelu(F.linear(h, layer.mlp.linear_fc1.weight, layer.mlp.linear_fc1.bias), approximate="tanh")
        return F.linear(h, layer.mlp.linear_fc2.weight, layer.mlp.linear_fc2.bias)

    return qkv, proj, mlp


def naive_fam_layer(x, fam0, qkv, proj, mlp, block, memory, scale, slopes=None):
    """TransformerFAM's layer as a loop over blocks: for block t the queries are [FAM; block] and
    the keys [memory blocks; FAM; block], with an explicit mask (block tokens: memory, FAM, own
    block causally; FAM: FAM and the whole block) and ALiBi distances from explicit positions (FAM
    keys at t*block - 1, FAM queries at (t+1)*block - 1); the result passes the residual and the
    MLP; the FAM part goes on to the next block."""
    s, b, _ = x.shape
    fam = fam0.unsqueeze(1).expand(-1, b, -1) if fam0 is not None else x[:0]
    nf = fam.shape[0]
    outs = []
    for t in range(-(-s // block)):
        start, end = t * block, min((t + 1) * block, s)
        first = max(0, start - memory * block)
        tokens = torch.cat([x[first:start], fam, x[start:end]])
        key_pos = list(range(first, start)) + [start - 1] * nf + list(range(start, end))
        key_kind = ["mem"] * (start - first) + ["fam"] * nf + ["own"] * (end - start)
        q, k, v = (u.permute(1, 2, 0, 3) for u in qkv(tokens))
        queries = list(range(start - first, len(key_pos)))  # FAM and block tokens
        query_pos = [start + block - 1 if key_kind[i] == "fam" else key_pos[i] for i in queries]

        def visible(qi, kj):
            if key_kind[queries[qi]] == "fam":
                return key_kind[kj] in ("fam", "own")
            return key_kind[kj] in ("mem", "fam") or key_pos[kj] <= query_pos[qi]

        mask = torch.tensor([[visible(i, j) for j in range(len(key_pos))] for i in range(len(queries))])
        bias = None
        if slopes is not None:
            bias = torch.tensor([[[-float(sl) * (qp - kp) for kp in key_pos] for qp in query_pos]
                                 for sl in slopes], dtype=x.dtype)
        ctx = reference_attention(q[:, :, queries], k, v, mask, scale, bias)
        h = tokens[start - first:] + proj(ctx.permute(2, 0, 1, 3).flatten(2))
        h = h + mlp(h)
        fam, out = h[:nf], h[nf:]
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("L,block,memory,fam,alibi,heads", [
    (24, 8, 1, 3, False, 4), (24, 6, 2, 2, True, 12), (24, 8, 0, 4, False, 4), (24, 8, 1, 0, True, 4),
    (21, 8, 1, 3, True, 4)])  # 21: a short last block (the layer itself accepts any length)
def test_fam_layer_equals_per_block_loop(one_process, L, block, memory, fam, alibi, heads):
    model = small_model(["fam"], {"fam": {"block_size": block, "memory_segments": memory, "fam_length": fam}},
                        heads=heads, alibi=alibi)
    layer = model.decoder.layers[0]
    x = randn(L, 2, 8 * heads, seed=8)
    out, _ = layer(x)
    qkv, proj, mlp = _fam_layer_parts(layer)
    ref = naive_fam_layer(x, layer.fam_init, qkv, proj, mlp, block, memory,
                          layer.self_attention.core_attention.scale, alibi_slopes(heads) if alibi else None)
    params = [x, layer.self_attention.linear_qkv.weight, layer.mlp.linear_fc1.weight]
    if fam:
        params.append(layer.fam_init)
    assert_close_with_grads(out, ref, params, TOL)


def test_fam_one_block_no_memory_is_causal_attention_over_fam_and_block():
    heads, B, Fl = 4, 7, 3
    attn = FamAttention(attention_config(heads), 1, block_size=B, memory_segments=0, fam_length=Fl).double()
    q, k, v = (randn(2, heads, B, 8, seed=i) for i in (10, 11, 12))
    qf, kf, vf = (randn(2, heads, Fl, 8, seed=i) for i in (13, 14, 15))
    block_out = attn.blocks(q, k, v, kf.unsqueeze(2), vf.unsqueeze(2))
    fam_out = attn.fam_step(qf, kf, vf, k, v)
    # Causal attention over the sequence [FAM; block], whose FAM rows see the whole block.
    Q, K, V = (torch.cat(p, dim=2) for p in ((qf, q), (kf, k), (vf, v)))
    mask = explicit_mask(Fl + B, lambda i, j: i < Fl or j <= i)
    ref = reference_attention(Q, K, V, mask, attn.scale)
    assert_close_with_grads(torch.cat([fam_out, block_out], dim=2), ref, (q, k, v, qf, kf, vf), TOL)


def test_fam_passes_fam_across_blocks_and_memory_gradients(one_process):
    """Block 3's output depends on block 0 only through the FAM chain (memory 1 block back)."""
    model = small_model(["fam"], {"fam": {"block_size": 6, "memory_segments": 1, "fam_length": 2}})
    layer = model.decoder.layers[0]
    x = randn(24, 1, 32, seed=9)
    out, _ = layer(x)
    grad = torch.autograd.grad(out[18:].sum(), x)[0]
    assert grad[:6].abs().sum() > 0  # through FAM
    assert grad[6:12].abs().sum() > 0  # through FAM (block 1 is beyond the memory of block 3)
    model_no_fam = small_model(["fam"], {"fam": {"block_size": 6, "memory_segments": 1, "fam_length": 0}})
    out, _ = model_no_fam.decoder.layers[0](x)
    grad = torch.autograd.grad(out[18:].sum(), x)[0]
    assert grad[:12].abs().sum() == 0 and grad[12:18].abs().sum() > 0  # memory only


def naive_fam_documents(x, fam0, qkv, proj, mlp, block, memory, scale, slopes, doc):
    """The FAM layer over packed documents (fam.py's docstring), one batch row x [s, 1, hidden], as
    a loop over blocks with explicit masks and positions: block tokens see memory and own-block
    tokens of their document, F_{t-1} when it is their document's, else the initial FAM (at their
    document's start - 1); F_t reads [F_{t-1} or, for a document started in block t, the initial
    FAM; block t's tokens of its last document]."""
    s = x.shape[0]
    init = fam0.unsqueeze(1)
    nf = init.shape[0]
    start_of = [doc.index(doc[i]) for i in range(s)]
    fam, fam_doc = init, doc[0]
    outs = []

    def attend(queries, q_pos, keys, k_pos, visible):
        q, _, _ = (u.permute(1, 2, 0, 3) for u in qkv(queries))
        _, k, v = (u.permute(1, 2, 0, 3) for u in qkv(keys))
        mask = torch.tensor([[visible(i, j) for j in range(len(k_pos(0)))] for i in range(len(q_pos))])
        bias = None
        if slopes is not None:
            bias = torch.tensor([[[-float(sl) * (q_pos[i] - kp) for kp in k_pos(i)] for i in range(len(q_pos))]
                                 for sl in slopes], dtype=x.dtype)
        return proj(reference_attention(q, k, v, mask, scale, bias).permute(2, 0, 1, 3).flatten(2))

    for t in range(-(-s // block)):
        start, end = t * block, min((t + 1) * block, s)
        first = max(0, start - memory * block)
        own = list(range(start, end))
        mem = list(range(first, start))
        # block tokens: keys [memory; F_{t-1}; initial FAM; own block]
        keys = torch.cat([x[first:start], fam, init, x[start:end]])
        kinds = ["mem"] * len(mem) + ["fam"] * nf + ["init"] * nf + ["own"] * len(own)
        where = mem + [None] * (2 * nf) + own

        def k_pos(i, own=own, start=start):
            p = own[i]
            return [j if j is not None else (start - 1 if kind == "fam" else start_of[p] - 1)
                    for j, kind in zip(where, kinds)]

        def visible(i, j, own=own):
            p, kind, kp = own[i], kinds[j], where[j]
            if kind == "fam":
                return fam_doc == doc[p]
            if kind == "init":
                return fam_doc != doc[p]
            return doc[kp] == doc[p] and (kind == "mem" or kp <= p)

        h = x[start:end] + attend(x[start:end], own, keys, k_pos, visible)
        outs.append(h + mlp(h))
        if not nf:
            continue
        # F_t
        last = doc[end - 1]
        restart = last != fam_doc
        prev = init if restart else fam
        origin = start_of[end - 1] - 1 if restart else start - 1
        keys = torch.cat([prev, x[start:end]])
        positions = [origin] * nf + own
        h = prev + attend(prev, [start + block - 1] * nf, keys, lambda i, positions=positions: positions,
                          lambda i, j, own=own, last=last: j < nf or doc[own[j - nf]] == last)
        fam, fam_doc = h + mlp(h), last
    return torch.cat(outs)


@pytest.mark.parametrize("L,block,memory,fam,alibi,rows", [
    (21, 4, 1, 2, False, [[1, 10, 2, 8], [13, 8]]),  # a one-token document; short last block
    (20, 5, 2, 3, True, [[3, 1, 1, 15], [20]]),
    (16, 4, 1, 0, True, [[6, 10], [2, 14]])])  # no FAM: block sliding window of one document
def test_fam_packed_documents_equal_per_block_loop(one_process, monkeypatch, L, block, memory, fam, alibi, rows):
    from megalong.attention.segments import DocumentSegments

    heads = 4
    model = small_model(["fam"], {"fam": {"block_size": block, "memory_segments": memory, "fam_length": fam}},
                        heads=heads, alibi=alibi, seq=24 if 24 % block == 0 else L)
    layer = model.decoder.layers[0]
    segments = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in rows])
    x = randn(L, 2, 8 * heads, seed=8)
    out, _ = layer(x, packed_seq_params=DocumentSegments(segment_ids=segments))
    qkv, proj, mlp = _fam_layer_parts(layer)
    fam0 = layer.fam_init if fam else torch.zeros(0, 8 * heads, dtype=x.dtype)
    ref = torch.cat([naive_fam_documents(x[:, r:r + 1], fam0, qkv, proj, mlp, block, memory,
                                         layer.self_attention.core_attention.scale,
                                         alibi_slopes(heads) if alibi else None, segments[r].tolist())
                     for r in range(2)], dim=1)
    params = [x, layer.self_attention.linear_qkv.weight, layer.mlp.linear_fc1.weight]
    if fam:
        params.append(layer.fam_init)
    assert_close_with_grads(out, ref, params, TOL)
    assert (layer(x)[0] - ref).abs().max() > 1e-3  # the documents meet without the segments
    # Forced onto the block kernel (interpreted here), the documents give the same, gradients too
    # (within float32: the kernel accumulates key/value gradients in float32).
    from megalong.kernels import select

    monkeypatch.setattr(select, "use_kernels", lambda *a, **k: True)
    forced, _ = layer(x, packed_seq_params=DocumentSegments(segment_ids=segments))
    assert_close_with_grads(forced, ref, params, KERNEL_TOL)


@pytest.mark.parametrize("alibi", [False, True])
def test_fam_documents_starting_at_block_boundaries_equal_documents_alone(one_process, alibi):
    from megalong.attention.segments import DocumentSegments

    model = small_model(["fam"], {"fam": {"block_size": 4, "memory_segments": 1, "fam_length": 2}}, alibi=alibi)
    layer = model.decoder.layers[0]
    x = randn(20, 1, 32, seed=3)
    segments = torch.tensor([[0] * 8 + [1] * 4 + [2] * 8])
    out, _ = layer(x, packed_seq_params=DocumentSegments(segment_ids=segments))
    alone = torch.cat([layer(x[a:b])[0] for a, b in ((0, 8), (8, 12), (12, 20))])
    assert_close_with_grads(out, alone, [x, layer.fam_init], TOL)
