"""Packed documents through the whole model: megatron's GPTModel carries the segment ids from its
forward to every layer's core attention (plain, recomputed and reversible stacks), and with reset
positions the per-token loss of a packed row equals that of each document run alone, float64,
and so do the weight gradients."""
from __future__ import annotations

import pytest
import torch

from attention.helpers import small_model
from megalong.train.documents import DocumentBatching, model_inputs

EOD = 2
SEQ = 24
KINDS = [["global", "local", "linear"], 1]
OPTIONS = {"local": {"window": 4}, "linear": {"chunk_size": 4}}


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 64, (2, SEQ + 1), generator=g)
    tokens[0, [0, 7, 8, 19]] = EOD  # a one-token document (just an EOD), a 1-token one at 8, ragged ends
    tokens[1, [12]] = EOD
    return tokens


def _per_token(model, tokens: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    positions = kwargs.pop("positions", None)
    if positions is None:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None, labels=labels, **kwargs)


@pytest.mark.parametrize("kinds,variant", [(KINDS, {}), (KINDS, {"reversible": True}),
                                           ([["global", "local"], 1], {"alibi": True})])
def test_packed_row_loss_equals_documents_alone(one_process, kinds, variant):
    model = small_model([kinds], OPTIONS, seq=SEQ, layers=len(kinds[0]), **variant)
    full = _tokens()
    batch = {"tokens": full[:, :-1], "labels": full[:, 1:], "loss_mask": torch.ones(2, SEQ)}
    batch = DocumentBatching(EOD, document_mask=True, reset_position_ids=True).apply(batch)
    tokens, positions, kwargs = model_inputs(batch)
    packed = _per_token(model, tokens, batch["labels"], positions=positions, **kwargs)
    grads = torch.autograd.grad(packed.sum(), list(model.parameters()), allow_unused=True)

    seg = batch["segment_ids"]
    alone = torch.empty_like(packed)
    total = None
    for r in range(2):
        for s in seg[r].unique().tolist():
            idx = (seg[r] == s).nonzero().flatten()
            a, b = int(idx[0]), int(idx[-1]) + 1
            out = _per_token(model, tokens[r:r + 1, a:b], batch["labels"][r:r + 1, a:b])
            alone[r, a:b] = out[0]
            g = torch.autograd.grad(out.sum(), list(model.parameters()), allow_unused=True)
            total = g if total is None else [x if y is None else (y if x is None else x + y) for x, y in zip(total, g)]
    assert (packed - alone).abs().max() < 1e-9
    for a, b in zip(grads, total):
        if a is not None:
            assert (a - b).abs().max() < 1e-9
    # Without the mask the documents see each other: different losses.
    crossing = _per_token(model, tokens, batch["labels"], positions=positions)
    assert (crossing - alone).abs().max() > 1e-3


def test_recompute_carries_the_segments(one_process):
    """megatron's full recompute re-runs the layers in the backward with the same segments."""
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                      "max_position_embeddings": SEQ, "attention_layers": ["global", "local"],
                                      "attention": {"local": {"window": 4}}},
                            "execution": {"recompute_granularity": "full", "recompute_method": "uniform",
                                          "recompute_num_layers": 1},
                            "data": {"document_mask": True}})
    validate(cfg, check_paths=False)
    torch.manual_seed(0)
    recomputed = build_model(cfg, 64).double()
    cfg.execution.recompute_granularity = cfg.execution.recompute_method = cfg.execution.recompute_num_layers = None
    torch.manual_seed(0)
    plain = build_model(cfg, 64).double()
    full = _tokens()
    batch = DocumentBatching(EOD, document_mask=True).apply({"tokens": full[:, :-1], "labels": full[:, 1:],
                                                            "loss_mask": torch.ones(2, SEQ)})
    results = []
    for model in (recomputed, plain):
        model.train()
        tokens, positions, kwargs = model_inputs(batch)
        loss = _per_token(model, tokens, batch["labels"], positions=positions, **kwargs).sum()
        loss.backward()  # megatron's reentrant checkpoint refuses autograd.grad
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-9
    for a, b in zip(results[0][1], results[1][1]):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("kind,options,variant", [
    ("fam", {"block_size": 4, "memory_segments": 1, "fam_length": 2}, {}),
    ("fam", {"block_size": 4, "memory_segments": 1, "fam_length": 2}, {"reversible": True}),
    ("axial", {"axial_shape": [4, 6]}, {})])
def test_first_document_of_a_packed_row_equals_it_alone(one_process, kind, options, variant):
    """Blocks and rows are cut from the packed row, so only a document starting at position 0 is
    computed exactly as alone: through GPTModel (FAM's own layer, and its reversible half), the
    segment ids reach the layer and the rest of the row changes nothing of the first document."""
    model = small_model([kind], {kind: options}, seq=SEQ, **variant)
    full = _tokens()
    full[0, 0] = 7  # row 0's first document: positions 0..7
    batch = DocumentBatching(EOD, document_mask=True, reset_position_ids=True).apply(
        {"tokens": full[:, :-1], "labels": full[:, 1:], "loss_mask": torch.ones(2, SEQ)})
    tokens, positions, kwargs = model_inputs(batch)
    packed = _per_token(model, tokens, batch["labels"], positions=positions, **kwargs)
    alone = _per_token(model, tokens[:1, :8], batch["labels"][:1, :8])
    assert (packed[0, :8] - alone[0]).abs().max() < 1e-9
    crossing = _per_token(model, tokens, batch["labels"], positions=positions)
    assert (crossing[0] - packed[0]).abs().max() > 1e-4


def test_eval_windows_keep_documents_apart(one_process):
    """`megalong eval`'s perplexity with the checkpoint's document_mask: each window's per-token
    losses are those of its documents run alone (the same tokens scored)."""
    import numpy as np
    import torch.nn.functional as F

    from megalong.evaluate import perplexity

    model = small_model([KINDS], OPTIONS, seq=SEQ, layers=3)
    stream = _tokens().flatten().numpy().astype(np.int64)[:2 * SEQ]
    documents = DocumentBatching(EOD, document_mask=True, reset_position_ids=True)
    result = perplexity(model, stream, SEQ, batch_size=2, documents=documents)
    windows = torch.from_numpy(stream.copy()).view(2, SEQ)
    seg = documents.apply({"tokens": windows, "loss_mask": torch.ones(2, SEQ)})["segment_ids"]
    total = 0.0
    with torch.no_grad():
        for r in range(2):
            for s in seg[r].unique().tolist():
                idx = (seg[r] == s).nonzero().flatten()
                piece = windows[r:r + 1, int(idx[0]):int(idx[-1]) + 1]
                logits = model(piece, torch.arange(piece.shape[1]).unsqueeze(0), None)
                targets = windows[r, int(idx[0]) + 1:int(idx[-1]) + 2]  # the next token, across the boundary
                n = len(targets)
                total += float(F.cross_entropy(logits[0, :n].float(), targets, reduction="sum"))
    assert result.tokens == 2 * (SEQ - 1)
    assert abs(result.loss - total / result.tokens) < 1e-6
    assert abs(perplexity(model, stream, SEQ, batch_size=2).loss - result.loss) > 1e-4


def test_compiled_layers_take_the_segments(one_process):
    """execution.compile: the DocumentSegments argument passes torch.compile'd layers (the same
    per-token losses as eager, float32)."""
    from megalong.model.compile import compile_layers

    model = small_model([KINDS], OPTIONS, seq=SEQ, layers=3).float()
    full = _tokens()
    batch = DocumentBatching(EOD, document_mask=True, reset_position_ids=True).apply(
        {"tokens": full[:, :-1], "labels": full[:, 1:], "loss_mask": torch.ones(2, SEQ)})
    tokens, positions, kwargs = model_inputs(batch)
    eager = _per_token(model, tokens, batch["labels"], positions=positions, **kwargs)
    compile_layers(model)
    compiled = _per_token(model, tokens, batch["labels"], positions=positions, **kwargs)
    assert (compiled - eager).abs().max() < 1e-4
