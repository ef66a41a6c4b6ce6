"""Corpus reading, tokenizer, preprocessing to megatron .bin/.idx, and GPT datasets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import REPO
from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, ReadStats, iter_documents, write_jsonl_zst
from megalong.data.datasets import build_gpt_datasets
from megalong.data.preprocess import preprocess
from megalong.data.stdlib_corpus import PILE_SET_NAME, build_stdlib_corpus
from megalong.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line.",
    "  indented code:\n    x = 1\n\n    return x  # trailing spaces   ",
    "ünïcödé, emoji 🎉 and digits 12345",
    "x",
    "long " * 3000,
]


def _write_zst(path: Path, lines: list[bytes]) -> None:
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as out:
        for line in lines:
            out.write(line + b"\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl_zst(root / "docs.jsonl.zst", DOCS, "Test")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tokenizer = train_sentencepiece([str(root / "docs.jsonl.zst")], str(root / "spm"), vocab_size=300)
    return root, str(tokenizer)


@pytest.mark.parametrize("name", ["docs.jsonl.zst", "docs.jsonl"])
def test_round_trip_through_megatron_reader(corpus, name):
    root, tokenizer_model = corpus
    stats = preprocess([str(root / name)], str(root / f"out_{name}"), tokenizer_model, workers=2,
                       progress=False)
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    dataset = IndexedDataset(str(root / f"out_{name}"))
    assert stats.documents == len(dataset) == len(DOCS)
    for i, doc in enumerate(DOCS):
        tokens = dataset[i].tolist()
        assert tokens[-1] == tokenizer.eod
        assert tokenizer.decode(tokens[:-1]) == doc
    assert dataset[0].dtype == np.uint16


def test_without_end_of_document(corpus):
    root, tokenizer_model = corpus
    preprocess([str(root / "docs.jsonl")], str(root / "noeod"), tokenizer_model, workers=1,
               append_eod=False, progress=False)
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    dataset = IndexedDataset(str(root / "noeod"))  # keep it alive: items are views of its mmap
    assert tokenizer.decode(dataset[2].tolist()) == DOCS[2]


def test_malformed_line_fails_with_file_and_line_and_writes_nothing(corpus, tmp_path):
    _, tokenizer_model = corpus
    bad = tmp_path / "bad.jsonl.zst"
    _write_zst(bad, [json.dumps({"text": "fine"}).encode(), json.dumps({"text": "also fine"}).encode(),
                     b'{"text": "broken', json.dumps({"text": "after"}).encode()])
    with pytest.raises(CorpusError, match=r"bad.jsonl.zst: line 3: not valid JSON"):
        preprocess([str(bad)], str(tmp_path / "out"), tokenizer_model, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == [bad]  # no final and no temporary .bin/.idx left behind
    stats = preprocess([str(bad)], str(tmp_path / "out"), tokenizer_model, workers=2,
                       skip_bad_lines=True, progress=False)
    assert (stats.documents, stats.bad_lines) == (3, 1)
    assert len(IndexedDataset(str(tmp_path / "out"))) == 3


def test_missing_key_bad_utf8_and_missing_files(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + json.dumps({"body": "x"}).encode()
                     + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 2: no 'text' key"):
        list(iter_documents([str(path)]))
    stats = ReadStats()
    assert list(iter_documents([str(path)], skip_bad_lines=True, stats=stats)) == ["ok"]
    assert stats.bad_lines == 2
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 2: not valid UTF-8"):
        list(iter_documents([str(path)]))
    with pytest.raises(CorpusError, match=r"missing.jsonl: file not found"):
        list(iter_documents([str(tmp_path / "missing.jsonl")]))
    with pytest.raises(CorpusError, match=r"no file matches"):
        list(iter_documents([str(tmp_path / "*.zst")]))


def test_truncated_zst_names_the_file(tmp_path):
    path = tmp_path / "t.jsonl.zst"
    rng = np.random.default_rng(0)
    write_jsonl_zst(path, [" ".join(map(str, rng.random(300))) for _ in range(20)], "Test")
    whole = path.read_bytes()
    assert len(list(iter_documents([str(path)]))) == 20
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"t.jsonl.zst: line \d+: truncated or corrupt zstd"):
        list(iter_documents([str(path)]))


def test_stdlib_corpus_is_pile_format(tmp_path):
    stats = build_stdlib_corpus(tmp_path / "s.jsonl.zst", max_docs=5)
    assert stats.documents == 5
    with zstandard.ZstdDecompressor().stream_reader(open(tmp_path / "s.jsonl.zst", "rb")) as f:
        records = [json.loads(line) for line in f.read().decode().splitlines()]
    assert len(records) == 5
    assert all(r["text"].strip() and r["meta"]["pile_set_name"] == PILE_SET_NAME for r in records)
    assert not any("/site-packages" in r["text"] or "/lib/python" in r["text"] for r in records)


def test_gpt_datasets_blend_two_prefixes(tiny_data, tmp_path):
    from megalong.parallel.distributed import initialize, shutdown

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    initialize(1)  # megatron's BlendedDataset asks torch.distributed for the rank
    try:
        train, valid, test = build_gpt_datasets([(0.7, tiny_data.prefix), (0.3, tiny_data.prefix)],
                                                "90,10,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))
    finally:
        shutdown()
    assert test is None and len(train) >= 40 and len(valid) >= 8
    sample = train[3]
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert sample["loss_mask"].sum() == 32


def test_split_without_documents_is_refused_before_megatron(tiny_data, tmp_path):
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    with pytest.raises(ConfigError, match=r"data.split: '100,0,0' gives the valid split 0 of the"):
        build_gpt_datasets([(1.0, tiny_data.prefix)], "100,0,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))


@pytest.mark.parametrize("tool", ["preprocess_data.py", "train_tokenizer.py"])
def test_tools_are_thin_wrappers(tool):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and "--input" in proc.stdout


def test_unigram_tokenizer_trains_and_exports(tmp_path):
    """A unigram model round-trips text exactly, in SentencePiece and through the exported
    AutoTokenizer; where their ids differ, both segmentations must score the same (a tie)."""
    from transformers import AutoTokenizer

    from megalong.export.tokenizer import export_tokenizer, sentencepiece_model_type

    corpus = tmp_path / "s.jsonl.zst"
    build_stdlib_corpus(corpus, max_docs=30)
    model = train_sentencepiece([str(corpus)], str(tmp_path / "uni"), vocab_size=600, model_type="unigram")
    assert sentencepiece_model_type(model) == "unigram"
    sp = SentencePieceTokenizer(model)
    out = tmp_path / "hf"
    out.mkdir()
    export_tokenizer(model, out)
    hf = AutoTokenizer.from_pretrained(out)
    texts = list(iter_documents([str(corpus)])) + DOCS

    def score(ids):
        return sum(sp._sp.get_score(i) for i in ids)

    same = 0
    for text in texts:
        ours, theirs = sp.encode(text), hf(text).input_ids
        assert sp.decode(ours) == text and hf.decode(theirs) == text
        if ours == theirs:
            same += 1
        else:
            assert score(ours) == pytest.approx(score(theirs), abs=1e-4)
    assert same > len(texts) // 2
