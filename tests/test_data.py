"""Corpus reading, tokenizer, preprocessing to megatron .bin/.idx, and GPT datasets."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import REPO
from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, ReadStats, iter_documents, write_jsonl_zst
from megalong.data.datasets import SAMPLE_KEYS, build_gpt_datasets, collate
from megalong.data.preprocess import PreprocessOptions, preprocess
from megalong.data.stdlib_corpus import PILE_SET_NAME, build_stdlib_corpus
from megalong.data.tokenizer import SentencePieceTokenizer
from megalong.data.tokenizer_training import train_sentencepiece
from megalong.errors import DatasetError

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nA second line.",
    "  indented code:\n    x = 1\n\n    return x  # trailing spaces   ",
    "ünïcödé, emoji 🎉, CJK 漢字 and digits 12345",
    "",
    " ",
    "\n\nstarts with newlines\ttab\r\nand CRLF\n",
    "x",
    "long " * 3000,
]
TRICKY = ["a\u00a0b", "e\u0301", "\u3000wide", "\x00\x01ctrl", "   ", "\n", "trailing\n\n"]


def _write_zst(path: Path, lines: list[bytes]) -> None:
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as out:
        for line in lines:
            out.write(line + b"\n")


def _read_zst_records(path: Path) -> list[dict]:
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl_zst(root / "docs.jsonl.zst", DOCS, "Test")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tokenizer = train_sentencepiece([str(root / "docs.jsonl.zst")], str(root / "spm"), vocab_size=300)
    return root, str(tokenizer)


# -- corpus reading ---------------------------------------------------------------------------------

def test_documents_know_their_file_and_line(corpus):
    root, _ = corpus
    docs = list(iter_documents(str(root / "docs.jsonl.zst")))
    assert docs == DOCS
    assert [(Path(d.path).name, d.line_number) for d in docs[:2]] == [("docs.jsonl.zst", 1),
                                                                      ("docs.jsonl.zst", 2)]
    assert all(r["meta"]["pile_set_name"] == "Test" for r in _read_zst_records(root / "docs.jsonl.zst"))


def test_missing_key_bad_utf8_and_missing_files(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + json.dumps({"body": "x"}).encode()
                     + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 2: no 'text' key"):
        list(iter_documents([str(path)]))
    assert list(iter_documents([str(path)], json_key="body", skip_bad_lines=True)) == ["x"]
    stats = ReadStats()
    assert list(iter_documents([str(path)], skip_bad_lines=True, stats=stats)) == ["ok"]
    assert stats.bad_lines == 2 and "line 3: not valid UTF-8" in stats.examples[1]
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 2: not valid UTF-8"):
        list(iter_documents([str(path)]))
    path.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl: line 1: 'text' is not a string"):
        list(iter_documents([str(path)]))
    with pytest.raises(CorpusError, match=r"missing.jsonl: file not found"):
        list(iter_documents([str(tmp_path / "missing.jsonl")]))
    with pytest.raises(CorpusError, match=r"\*.zst: no file matches"):
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


# -- tokenizer and preprocessing --------------------------------------------------------------------

def test_tokenizer_round_trips_text_exactly(corpus):
    root, tokenizer_model = corpus
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    for text in DOCS + TRICKY:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.id_to_piece(tokenizer.eod) == "</s>" and tokenizer.pad == -1
    newline = tokenizer._sp.piece_to_id("\n")  # a piece of its own, never bytes or <unk>
    assert newline != tokenizer._sp.unk_id() and tokenizer.encode("a\n\nb").count(newline) == 2
    settings = json.loads((root / "spm.settings.json").read_text())
    assert settings["normalization_rule_name"] == "identity" and settings["byte_fallback"]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(DOCS[2]) == tokenizer.encode(DOCS[2])


@pytest.mark.parametrize("name", ["docs.jsonl.zst", "docs.jsonl"])
def test_round_trip_through_megatron_reader(corpus, name):
    root, tokenizer_model = corpus
    stats = preprocess(PreprocessOptions([str(root / name)], str(root / f"out_{name}"), tokenizer_model, workers=2))
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    dataset = IndexedDataset(str(root / f"out_{name}"))
    assert stats.documents == len(dataset) == len(DOCS) and stats.bad_lines == 0
    assert stats.tokens == sum(len(dataset[i]) for i in range(len(dataset)))
    for i, doc in enumerate(DOCS):
        tokens = dataset[i].tolist()
        assert tokens[-1] == tokenizer.eod and tokenizer.eod not in tokens[:-1]
        assert tokenizer.decode(tokens[:-1]) == doc
    assert dataset[0].dtype == np.uint16
    assert not [p for p in root.iterdir() if ".tmp" in p.name]


def test_without_end_of_document(corpus):
    root, tokenizer_model = corpus
    preprocess(PreprocessOptions([str(root / "docs.jsonl")], str(root / "noeod"), tokenizer_model, workers=1,
               append_eod=False))
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    dataset = IndexedDataset(str(root / "noeod"))  # keep it alive: items are views of its mmap
    assert [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))] == DOCS


def test_malformed_line_fails_with_file_and_line_and_writes_nothing(corpus, tmp_path):
    _, tokenizer_model = corpus
    bad = tmp_path / "bad.jsonl.zst"
    _write_zst(bad, [json.dumps({"text": "fine"}).encode(), json.dumps({"text": "also fine"}).encode(),
                     b'{"text": "broken', json.dumps({"text": "after"}).encode()])
    with pytest.raises(CorpusError, match=r"bad.jsonl.zst: line 3: not valid JSON"):
        preprocess(PreprocessOptions([str(bad)], str(tmp_path / "out"), tokenizer_model, workers=2))
    assert list(tmp_path.iterdir()) == [bad]  # no final and no temporary .bin/.idx left behind
    stats = preprocess(PreprocessOptions([str(bad)], str(tmp_path / "out"), tokenizer_model, workers=2,
                       on_bad="skip"))
    assert (stats.documents, stats.bad_lines) == (3, 1)
    assert "line 3" in stats.bad_examples[0] and "1 bad lines skipped" in str(stats)
    assert len(IndexedDataset(str(tmp_path / "out"))) == 3
    # A failing run leaves a previous good result under the final names untouched.
    before = (tmp_path / "out.bin").read_bytes()
    with pytest.raises(CorpusError, match=r"line 3"):
        preprocess(PreprocessOptions([str(bad)], str(tmp_path / "out"), tokenizer_model, workers=1))
    assert (tmp_path / "out.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl.zst", "out.bin", "out.done.json",
                                                          "out.idx"]


def test_preprocess_argument_errors(corpus, tmp_path):
    root, tokenizer_model = corpus
    with pytest.raises(ConfigError, match=r"--tokenizer-model.*nope.model not found"):
        preprocess(PreprocessOptions([str(root / "docs.jsonl")], str(tmp_path / "o"), str(tmp_path / "nope.model")))
    with pytest.raises(CorpusError, match=r"missing.jsonl.zst: file not found"):
        preprocess(PreprocessOptions([str(tmp_path / "missing.jsonl.zst")], str(tmp_path / "o"), tokenizer_model))
    with pytest.raises(CorpusError, match=r"docs.jsonl: line 1: no 'body' key"):
        preprocess(PreprocessOptions([str(root / "docs.jsonl")], str(tmp_path / "o"), tokenizer_model, json_keys="body"))
    assert list(tmp_path.iterdir()) == []


# -- the embedded default corpus ---------------------------------------------------------------------

def test_stdlib_corpus_is_pile_format(tmp_path):
    stats = build_stdlib_corpus(tmp_path / "s.jsonl.zst", max_docs=5)
    assert stats.documents == 5
    records = _read_zst_records(tmp_path / "s.jsonl.zst")
    assert len(records) == 5
    assert all(r["text"].strip() and r["meta"]["pile_set_name"] == PILE_SET_NAME for r in records)
    assert "NAME\n    abc - Abstract Base Classes" in records[0]["text"]


def test_stdlib_corpus_carries_nothing_of_this_machine(tiny_data):
    """The conftest corpus (the first 120 modules) includes cgi, whose pydoc page prints
    os.environ as a default argument: the child runs with an empty environment."""
    corpus = Path(tiny_data.prefix).with_name("docs.jsonl.zst")
    docs = list(iter_documents([str(corpus)]))
    assert len(docs) == 120 and any("module cgi" in d.split("\n")[0] for d in docs)
    leaks = [os.environ.get("PATH"), os.environ.get("HOME"), sys.prefix, " at 0x"]
    for doc in docs:
        assert not any(leak and leak in doc for leak in leaks), doc[:80]


# -- GPT datasets ------------------------------------------------------------------------------------

def _check_samples(train, valid, seq_length=32):
    assert len(train) >= 40 and len(valid) >= 8
    sample = train[3]
    assert set(SAMPLE_KEYS) <= set(sample) and "attention_mask" not in sample
    assert sample["tokens"].shape == sample["labels"].shape == (seq_length,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert sample["loss_mask"].sum() == seq_length
    assert sample["position_ids"].tolist() == list(range(seq_length))
    batch = collate([train[i] for i in range(4)])
    assert batch["tokens"].shape == batch["labels"].shape == (4, seq_length)
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["dataset_id"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32


def test_gpt_datasets_blend_two_prefixes_in_a_plain_process_and_under_gloo(tiny_data, tmp_path):
    import torch.distributed as dist

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    blend = [(0.7, tiny_data.prefix), (0.3, tiny_data.prefix)]
    assert not dist.is_initialized()
    train, valid, test = build_gpt_datasets(blend, "90,10,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))
    assert test is None and not dist.is_initialized()
    _check_samples(train, valid)
    assert list(tmp_path.rglob("*BlendedDataset-train-dataset_index.npy"))  # the index cache
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train2, valid2, _ = build_gpt_datasets(blend, "90,10,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))
        assert dist.is_initialized()  # the caller's group is left alone
    finally:
        dist.destroy_process_group()
    _check_samples(train2, valid2)
    assert all((train[i]["tokens"] == train2[i]["tokens"]).all() for i in range(10))


class _MkdirPayload:
    """Pickles as a call of os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_an_index_cache_holding_a_pickle_is_refused_before_megatron_reads_it(tiny_data, tmp_path, monkeypatch):
    """megatron-core loads its index cache with numpy.load(allow_pickle=True), so a pickle under the
    name of one of its .npy files runs (shown with megalong's check switched off); with the check,
    the build is refused with the file named and nothing runs."""
    import megalong.data.datasets as datasets

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    blend = [(0.7, tiny_data.prefix), (0.3, tiny_data.prefix)]
    build = lambda: build_gpt_datasets(blend, "90,10,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))  # noqa: E731
    build()
    [index] = tmp_path.rglob("*BlendedDataset-train-dataset_index.npy")
    marker = tmp_path / "pwned"
    index.write_bytes(pickle.dumps(_MkdirPayload(marker)))
    with pytest.raises(DatasetError, match=rf"{index.name}: not a \.npy array file .* numpy would load it as a pickle"):
        build()
    assert not marker.exists()
    monkeypatch.setattr(datasets, "check_index_cache", lambda directory: 0)
    with contextlib.suppress(Exception):
        build()
    assert marker.is_dir()  # what the check prevents


def test_split_without_documents_is_refused_before_megatron(tiny_data, tmp_path):
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    with pytest.raises(ValueError, match=r"data.split: '100,0,0' gives the valid split 0 of the 120 "
                                         rf"documents of {tiny_data.prefix}"):
        build_gpt_datasets([(1.0, tiny_data.prefix)], "100,0,0", 32, 1, tokenizer, (40, 8, 0), str(tmp_path))
    with pytest.raises(ValueError, match=r"data.split: '99.9,0.1' gives the valid split 0 of the 120"):
        build_gpt_datasets([(1.0, tiny_data.prefix)], "99.9,0.1", 32, 1, tokenizer, (40, 8, 0), None)
    with pytest.raises(ConfigError, match=r"data.split: expected comma-separated numbers"):
        build_gpt_datasets([(1.0, tiny_data.prefix)], "90;10", 32, 1, tokenizer, (40, 8, 0), None)
    with pytest.raises(DatasetError, match=r"data.train\[1\].path: .*nowhere.bin: file not found"):
        build_gpt_datasets([(1.0, tiny_data.prefix), (1.0, str(tmp_path / "nowhere"))], "90,10,0", 32, 1,
                           tokenizer, (40, 8, 0), None)
    # Not asked for samples, an empty split is fine and not built.
    train, valid, test = build_gpt_datasets([(1.0, tiny_data.prefix)], "100,0,0", 32, 1, tokenizer,
                                            (40, 0, 0), None)
    assert len(train) >= 40 and valid is None and test is None


def test_split_of_empty_documents_is_refused(corpus, tmp_path):
    root, tokenizer_model = corpus
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": "some text"}) + "\n" + json.dumps({"text": ""}) + "\n")
    preprocess(PreprocessOptions([str(path)], str(tmp_path / "e"), tokenizer_model, workers=1, append_eod=False))
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    with pytest.raises(ValueError, match=r"gives the valid split 1 empty documents \(0 tokens\)"):
        build_gpt_datasets([(1.0, str(tmp_path / "e"))], "50,50", 8, 1, tokenizer, (4, 4, 0), None)


# -- tools and the unigram model ---------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["preprocess_data.py", "train_tokenizer.py"])
def test_tools_are_thin_wrappers(tool, tmp_path):
    run = [sys.executable, str(REPO / "tools" / tool)]
    proc = subprocess.run(run + ["--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--input" in proc.stdout and "--json-key" in proc.stdout
    args = {"preprocess_data.py": ["--output-prefix", "o", "--tokenizer-model", "t.model"],
            "train_tokenizer.py": ["--model-prefix", "m", "--vocab-size", "300"]}[tool]
    proc = subprocess.run(run + ["--input", str(tmp_path / "none.jsonl"), *args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


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
