"""The long-context report (megalong/eval/passkey.py) on a tiny random model of every attention
kind, its accuracy against greedy decoding and against models forced to be right or wrong at the
key's positions; perplexity through EvalModel equal to megalong/evaluate.py's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megalong.attention.registry import ATTENTION_KINDS
from megalong.eval.model import EvalModel, Scores

LENGTH = 128
OPTIONS = {"local": {"window": 8}, "lsh": {"bucket_size": 16}, "axial": {"axial_shape": [8, 16]},
           "fam": {"block_size": 16, "memory_segments": 1, "fam_length": 4}, "linear": {"chunk_size": 16}}


def random_model(kind: str, tokenizer, data: dict | None = None) -> EvalModel:
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize

    cfg = config_from_dict({"data": data or {}, "model": {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": LENGTH,
        "position_embedding": "none", "attention_layers": [[[kind, "global"], 1]],
        "attention": {kind: OPTIONS[kind]} if kind in OPTIONS else {}}})
    validate(cfg, check_paths=False)
    layout = initialize(1)
    torch.manual_seed(0)
    return EvalModel([build_model(cfg, tokenizer.vocab_size).eval()], cfg, tokenizer, layout)


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_passkey_runs_on_every_kind_and_equals_greedy_decoding(tiny_data, kind):
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.eval.passkey import passkey_accuracy, passkey_prompt
    from megalong.generate import generate
    from megalong.parallel.distributed import shutdown
    import random

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    try:
        model = random_model(kind, tokenizer)
        for depth in (0.0, 0.5, 1.0):
            accuracy = passkey_accuracy(model, LENGTH, depth, trials=3, seed=1, batch_size=2)
            rng = random.Random(f"1-{LENGTH}-{depth}")
            right = 0
            for _ in range(3):
                ids, n = passkey_prompt(tokenizer, LENGTH, depth, rng.randrange(10000, 100000))
                assert len(ids) == LENGTH
                right += generate(model.chunks[0], ids[:-n], n) == ids[-n:]
            assert accuracy == right / 3, (kind, depth)
    finally:
        shutdown()


class Forced:
    """A model whose argmax is right exactly at positions [LENGTH - n - 1 + shift, LENGTH - 1 + shift)."""

    def __init__(self, tokenizer, n: int, shift: int):
        self.tokenizer, self.n, self.shift = tokenizer, n, shift

    def score(self, tokens, targets):
        greedy = torch.zeros(tokens.shape, dtype=torch.bool)
        lo = LENGTH - self.n - 1 + self.shift
        greedy[:, max(0, lo):lo + self.n] = True
        return Scores(torch.zeros(tokens.shape), greedy, torch.zeros(tokens.shape, dtype=torch.long))


def test_passkey_accuracy_reads_exactly_the_key_positions(tiny_data):
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.eval.passkey import passkey_accuracy, passkey_prompt

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    ids, n = passkey_prompt(tokenizer, LENGTH, 0.3, 12345)
    assert ids[-n:] == tokenizer.encode(" 12345") 
    assert " ".join(tokenizer.decode(ids).split()).endswith("What is the pass key? The pass key is 12345")
    needle = tokenizer.encode(" The pass key is 12345. Remember it. 12345 is the pass key.")
    starts = [i for i in range(LENGTH) if ids[i:i + len(needle)] == needle]
    room = LENGTH - len(needle) - len(tokenizer.encode(" What is the pass key? The pass key is")) - n
    assert starts == [round(0.3 * room)]
    assert passkey_accuracy(Forced(tokenizer, n, 0), LENGTH, 0.3, trials=4) == 1.0
    for shift in (-1, 1):  # one position off: never right
        assert passkey_accuracy(Forced(tokenizer, n, shift), LENGTH, 0.3, trials=4) == 0.0


def test_stream_loss_equals_evaluate_perplexity(tiny_data):
    """Also with packed documents (data.document_mask, reset_position_ids): the windows attend
    within their documents, as megalong/evaluate.py's (a different loss than without)."""
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.eval.passkey import stream_loss
    from megalong.evaluate import held_out_tokens, perplexity
    from megalong.parallel.distributed import shutdown
    from megalong.train.documents import DocumentBatching

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    stream = held_out_tokens(tiny_data.prefix, "90,10,0", max_tokens=1000).copy()
    stream[37::41] = tokenizer.eod  # the corpus's documents are longer than a window: short ones
    losses = []
    for data in ({}, {"document_mask": True, "reset_position_ids": True}):
        try:
            model = random_model("local", tokenizer, data)
            loss, tokens = stream_loss(model, stream, 96, batch_size=4)
            documents = DocumentBatching(tokenizer.eod, True, True) if data else None
            reference = perplexity(model.chunks[0], stream, 96, batch_size=3, documents=documents)
        finally:
            shutdown()
        assert tokens == reference.tokens == (1000 // 96) * 95
        assert loss == pytest.approx(reference.loss, rel=1e-6) and np.isfinite(loss)
        losses.append(loss)
    assert abs(losses[0] - losses[1]) > 1e-4


def test_long_context_report_from_a_checkpoint(tiny_data, tmp_path, capsys):
    """`megalong eval --passkey --seq-length ...` on an ALiBi checkpoint, past its training length:
    the table, and one JSON line per length whose perplexity is megalong/evaluate.py's."""
    import json

    from conftest import tiny_overrides
    from megalong.cli import main
    from megalong.config import load_config
    from megalong.evaluate import evaluate_checkpoint
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    args = tiny_overrides(tiny_data, tmp_path / "run", 1, **{"model.alibi": "true",
                                                            "model.position_embedding": "none"})
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    out = tmp_path / "long.jsonl"
    assert main(["eval", str(tmp_path / "run"), "--passkey", "--seq-length", "96", "128", "--trials", "2",
                 "--depths", "0", "1", "--tokens", "512", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq_length"] for r in rows] == [96, 128] and all(r["report"] == "long_context" for r in rows)
    assert all(set(r["passkey"]) == {"0", "1"} and r["trials"] == 2 and r["step"] == 1 for r in rows)
    reference = evaluate_checkpoint(tmp_path / "run", [96, 128], max_tokens=512)
    for row, ref in zip(rows, reference):
        assert row["loss"] == pytest.approx(ref.loss, rel=1e-6) and row["tokens"] == ref.tokens
