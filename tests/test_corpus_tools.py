"""Corpus tools at scale: shards per input file, resume after a kill, bad input, big documents,
subsets, keys, other tokenizers, inspect/merge, blends, tokenizer sampling."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import REPO
from megalong.data.corpus import CorpusError, iter_blocks, iter_documents, write_jsonl_zst
from megalong.data.indexed import ShardWriter, read_index, token_dtype
from megalong.data.preprocess import PreprocessOptions, preprocess
from megalong.data.long_documents import encode_long
from megalong.data.tokenizer import SentencePieceTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def docs(tiny_data) -> list[str]:
    return [str(d) for d in iter_documents([str(Path(tiny_data.prefix).with_name("docs.jsonl.zst"))])]


def _write_jsonl(path: Path, records: list, zst: bool = False) -> Path:
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def _three_files(root: Path, docs: list[str]) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [str(_write_jsonl(root / "a.jsonl", [{"text": d} for d in docs[:40]])),
            str(_write_jsonl(root / "b.jsonl.zst", [{"text": d} for d in docs[40:80]], zst=True)),
            str(_write_jsonl(root / "c.jsonl", [{"text": d} for d in docs[80:]]))]


def _decoded(prefix: str, tokenizer) -> list[str]:
    dataset = IndexedDataset(prefix)
    out = []
    for i in range(len(dataset)):
        tokens = dataset[i].tolist()
        assert tokens[-1] == tokenizer.eod
        out.append(tokenizer.decode(tokens[:-1]))
    return out


def _files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".bin", ".idx")}


# -- shards, megatron round trip, the word cache ----------------------------------------------------

def test_one_shard_per_file_round_trips_through_megatron(tiny_data, docs, tmp_path):
    files = _three_files(tmp_path / "in", docs)
    stats = preprocess(PreprocessOptions(files, str(tmp_path / "out" / "p"), tiny_data.tokenizer, workers=2,
                       chunk_bytes=1 << 14))
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    assert stats.files_done == 3 and stats.documents == len(docs)
    assert _decoded(str(tmp_path / "out" / "p_a"), tokenizer) == docs[:40]
    assert _decoded(str(tmp_path / "out" / "p_b"), tokenizer) == docs[40:80]
    assert _decoded(str(tmp_path / "out" / "p_c"), tokenizer) == docs[80:]
    assert read_index(tmp_path / "out" / "p_a.idx")[0] == np.uint16
    record = json.loads((tmp_path / "out" / "p_b.done.json").read_text())
    assert record["outputs"][str(tmp_path / "out" / "p_b")]["documents"] == 40
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []
    # The word cache changes nothing: a run without it writes the same bytes.
    preprocess(PreprocessOptions(files, str(tmp_path / "plain" / "p"), tiny_data.tokenizer, workers=1, word_cache=False))
    assert _files_of(tmp_path / "out") == _files_of(tmp_path / "plain")


def test_word_cache_and_long_documents_encode_exactly(tiny_data, docs):
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    assert tokenizer.word_local
    tricky = ["  lead", "trail  ", "a  b\n  c\n\nd", "x\u00a0y \u3000z", "", " ", "\n", "12345 678"]
    texts = docs + tricky
    assert tokenizer.encode_batch_words(texts, {}) == tokenizer.encode_batch(texts, 1)
    cache: dict = {}
    tokenizer.encode_batch_words(docs[:5], cache, max_cache=50)  # clears itself when full
    assert len(cache) <= 50 + 1 + max(len(d.split()) for d in docs[:5])
    big = "".join(docs[:8])
    whole = tokenizer.encode(big)
    for max_chars in (1000, 5000):
        assert encode_long(tokenizer, big, max_chars, np.int32).tolist() == whole


# -- resume after a kill ----------------------------------------------------------------------------

# A run killed (SIGKILL, no cleanup) after `die_after` blocks are written: the crash is injected
# through the event handler, which preprocess calls after every block (BlockWritten).
KILLED_RUN = """
import os, sys
from megalong.data.preprocess import PreprocessOptions, preprocess
from megalong.data.preprocess_events import BlockWritten
die_after = int(sys.argv[6])

def die_after_blocks(event):
    if isinstance(event, BlockWritten) and event.blocks >= die_after:
        os.kill(os.getpid(), 9)

preprocess(PreprocessOptions(sys.argv[1:4], sys.argv[4], sys.argv[5], workers=2, chunk_bytes=1 << 13),
           die_after_blocks)
"""


def test_resume_after_kill_is_byte_identical(tiny_data, docs, tmp_path):
    files = _three_files(tmp_path / "in", docs)
    out = tmp_path / "killed"
    blocks_in_a = sum(1 for _ in iter_blocks(files[0], 1 << 13))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *files, str(out / "p"), tiny_data.tokenizer,
                             str(blocks_in_a + 2)],  # dies inside file b
                            env=env, start_new_session=True, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its orphaned pool workers
    except ProcessLookupError:
        pass
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"p_a.bin", "p_a.idx", "p_a.done.json", ".p_b.tmp"} <= names  # b was half done
    assert not names & {"p_b.bin", "p_b.idx", "p_b.done.json", "p_c.bin", "p_c.idx"}
    a_before = (out / "p_a.bin").stat().st_mtime_ns
    stats = preprocess(PreprocessOptions(files, str(out / "p"), tiny_data.tokenizer, workers=2))
    assert (stats.files_skipped, stats.files_done) == (1, 2)
    assert (out / "p_a.bin").stat().st_mtime_ns == a_before
    assert not (out / ".p_b.tmp").exists()
    preprocess(PreprocessOptions(files, str(tmp_path / "whole" / "p"), tiny_data.tokenizer, workers=2))
    assert _files_of(out) == _files_of(tmp_path / "whole")
    # A shard whose files no longer match their record is redone; other settings redo all.
    with open(out / "p_c.bin", "ab") as f:
        f.write(b"xx")
    stats = preprocess(PreprocessOptions(files, str(out / "p"), tiny_data.tokenizer, workers=1))
    assert (stats.files_skipped, stats.files_done) == (2, 1)
    assert _files_of(out) == _files_of(tmp_path / "whole")
    stats = preprocess(PreprocessOptions(files, str(out / "p"), tiny_data.tokenizer, workers=1, append_eod=False))
    assert (stats.files_skipped, stats.files_done) == (0, 3)


# -- bad input --------------------------------------------------------------------------------------

def _bad_file(kind: str, root: Path) -> tuple[str, str, int]:
    """(path, the error a stopping run reports, documents a skipping run keeps)."""
    good = [{"text": "one"}, {"text": "two"}]
    if kind == "missing_file":
        return str(root / "gone.jsonl"), r"gone.jsonl: file not found", 0
    if kind == "truncated_zst":
        rng = np.random.default_rng(0)
        path = root / "bad.jsonl.zst"
        write_jsonl_zst(path, [" ".join(map(str, rng.random(400))) for _ in range(30)], "Test")
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) * 2 // 3])
        kept = sum(1 for _ in _lines_before_damage(path))
        return str(path), r"bad.jsonl.zst: line \d+: truncated or corrupt zstd", kept
    line, error = {
        "non_utf8": (b'{"text": "caf\xe9"}', r"bad.jsonl: line 2: not valid UTF-8"),
        "non_json": (b'{"text": "broken', r"bad.jsonl: line 2: not valid JSON"),
        "missing_key": (b'{"body": "x"}', r"bad.jsonl: line 2: no 'text' key"),
        "empty_doc": (b'{"text": ""}', r"bad.jsonl: line 2: empty document"),
    }[kind]
    path = _write_jsonl(root / "bad.jsonl", [good[0], line, good[1]])
    return str(path), error, 2


def _lines_before_damage(path: Path):
    try:
        for line in iter_documents([str(path)]):
            yield line
    except CorpusError:
        return


def test_a_worker_that_dies_ends_the_run_with_an_error_naming_the_file(tiny_data, docs, tmp_path):
    """A worker killed mid-run (the OOM killer, a segfault) raises a CorpusError naming the file
    being tokenized and leaves no shard under a final name; a multiprocessing.Pool would wait
    for the lost block forever."""
    import psutil

    from megalong.data.corpus import CorpusError
    from megalong.data.preprocess_events import BlockWritten

    files = _three_files(tmp_path / "in", docs)
    me = psutil.Process()
    killed = []

    def kill_workers(event):
        if isinstance(event, BlockWritten) and not killed:
            workers = [p for p in me.children() if "multiprocessing" in " ".join(p.cmdline())]
            assert workers, "no worker processes"
            for worker in workers:
                worker.kill()
            killed.extend(workers)

    with pytest.raises(CorpusError) as error:
        preprocess(PreprocessOptions(files, str(tmp_path / "out" / "p"), tiny_data.tokenizer, workers=2,
                                     chunk_bytes=1 << 12), kill_workers)
    message = str(error.value)
    assert killed and "worker process died" in message and message.startswith(files[0]), message
    assert not list((tmp_path / "out").glob("p_a.*")) and not (tmp_path / "out" / ".p_a.tmp").exists()


@pytest.mark.parametrize("kind", ["non_utf8", "non_json", "missing_key", "empty_doc", "truncated_zst",
                                  "missing_file"])
def test_bad_input_stops_with_file_and_line_or_is_skipped_and_counted(tiny_data, kind, tmp_path):
    good = str(_write_jsonl(tmp_path / "0good.jsonl", [{"text": "a good document"}] * 3))
    bad, error, kept = _bad_file(kind, tmp_path)
    options = {"empty_docs": "stop"} if kind == "empty_doc" else {}
    with pytest.raises(CorpusError, match=error):
        preprocess(PreprocessOptions([good, bad], str(tmp_path / "out" / "p"), tiny_data.tokenizer, workers=1, **options))
    if kind != "missing_file":  # a missing file stops the run before anything is written
        assert len(IndexedDataset(str(tmp_path / "out" / "p_0good"))) == 3  # the shard done before: kept
        assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(("p_bad", ".p_bad"))]
    options = {"empty_docs": "skip"} if kind == "empty_doc" else {"on_bad": "skip"}
    stats = preprocess(PreprocessOptions([good, bad], str(tmp_path / "out" / "p"), tiny_data.tokenizer, workers=1, **options))
    skipped = stats.empty_documents if kind == "empty_doc" else stats.bad_lines
    # The good shard is kept from the first run unless that stopped early or had other settings.
    redone = kind in ("missing_file", "empty_doc")
    assert skipped == 1 and stats.files_skipped == (0 if redone else 1)
    assert stats.documents == kept + (3 if redone else 0)
    if kind == "missing_file":
        assert "gone.jsonl: file not found" in stats.bad_examples[0]
    else:
        assert len(IndexedDataset(str(tmp_path / "out" / "p_bad"))) == kept
    if kind == "empty_doc":  # kept by default, as a document of just the end-of-document token
        stats = preprocess(PreprocessOptions([bad], str(tmp_path / "keep"), tiny_data.tokenizer, workers=1))
        assert stats.documents == 3 and len(IndexedDataset(str(tmp_path / "keep"))[1]) == 1


# -- one huge document ------------------------------------------------------------------------------

BIG_DOC_RUN = """
import json, resource, sys
from megalong.data.preprocess import PreprocessOptions, preprocess
from megalong.data.tokenizer import SentencePieceTokenizer
small, big, model, out = sys.argv[1:5]
preprocess(PreprocessOptions([small], out + "_warm", model, workers=1))  # imports and caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
stats = preprocess(PreprocessOptions([big], out, model, workers=1, max_doc_chars=int(sys.argv[5])))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "tokens": stats.tokens}))
"""


def test_a_huge_document_costs_a_few_times_its_size(tiny_data, docs, tmp_path):
    text = "\n".join(docs)
    text = (text * (8_000_000 // len(text) + 1))[:8_000_000]
    big = _write_jsonl(tmp_path / "big.jsonl", [{"text": text}])
    small = _write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in docs[:3]])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", BIG_DOC_RUN, str(small), str(big), tiny_data.tokenizer,
                           str(tmp_path / "out"), "1000000"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The line (bytes), its text (str) and the tokens (uint16) are each about the document's size;
    # a Python list of its tokens alone would be ~10x (an 8-byte pointer + a 28-byte int per id).
    assert result["growth"] < 5 * len(text), result
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert len(dataset) == 1 and len(dataset[0]) == result["tokens"]
    assert tokenizer.decode(dataset[0][:-1].tolist()) == text


# -- subsets, keys, normalisation, other tokenizers ---------------------------------------------------

def test_subset_filter_and_split_keys_and_normalisation(tiny_data, tmp_path):
    records = [{"text": f"doc {i} \ufb01ne", "title": f"T{i}", "meta": {"pile_set_name": name}}
               for i, name in enumerate(["Pile-CC", "FreeLaw", "Pile-CC", "Ubuntu IRC", "FreeLaw"])]
    path = _write_jsonl(tmp_path / "pile.jsonl.zst", records, zst=True)
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    stats = preprocess(PreprocessOptions([str(path)], str(tmp_path / "s"), tiny_data.tokenizer, workers=1,
                       split_by_subset=True, subsets=["Pile-CC", "Ubuntu IRC"], json_keys=["title", "text"],
                       normalize="nfkc"))
    assert stats.filtered == 2 and stats.documents == 3
    assert _decoded(str(tmp_path / "s_Pile-CC"), tokenizer) == ["T0\n\ndoc 0 fine", "T2\n\ndoc 2 fine"]
    assert _decoded(str(tmp_path / "s_Ubuntu_IRC"), tokenizer) == ["T3\n\ndoc 3 fine"]
    assert not (tmp_path / "s_FreeLaw.bin").exists()
    assert unicodedata.normalize("NFKC", "\ufb01") == "fi"
    with pytest.raises(CorpusError, match=r"line 1: no 'meta.pile_set_name'"):
        plain = _write_jsonl(tmp_path / "plain.jsonl", [{"text": "x"}])
        preprocess(PreprocessOptions([str(plain)], str(tmp_path / "x"), tiny_data.tokenizer, workers=1,
                   split_by_subset=True))


def test_hugging_face_tokenizer_json_and_int32_tokens(docs, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs[:30], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs[:30]])
    preprocess(PreprocessOptions([str(path)], str(tmp_path / "hf"), str(tmp_path / "tokenizer.json"), workers=2,
               max_doc_chars=2000))
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert hf.eod == tok.token_to_id("<|endoftext|>")
    assert _decoded(str(tmp_path / "hf"), hf) == docs[:30]
    assert token_dtype(50_000) == np.uint16 and token_dtype(70_000) == np.int32
    writer = ShardWriter(tmp_path / "wide", np.int32)
    writer.add(np.array([70_000, 1, 99_999], np.int64), np.array([2, 1]))
    writer.finish()
    wide = IndexedDataset(str(tmp_path / "wide"))
    assert wide[0].dtype == np.int32 and wide[0].tolist() == [70_000, 1] and wide[1].tolist() == [99_999]


# -- progress, inspect, merge, blend, tokenizer sampling ---------------------------------------------

def test_progress_inspect_and_merge(tiny_data, docs, tmp_path, caplog, capsys):
    from megalong.cli import main

    files = _three_files(tmp_path / "in", docs)
    with caplog.at_level(logging.INFO, logger="megalong"):
        preprocess(PreprocessOptions(files, str(tmp_path / "p"), tiny_data.tokenizer, workers=1, log_interval=0,
                   chunk_bytes=1 << 14))
    line = next(r.getMessage() for r in caplog.records if "file 2/3" in r.getMessage())
    for what in ("docs/s", "MB/s", "tokens/s", "ETA"):
        assert line.count(what) == 2, line  # for the file and overall
    assert main(["data", "merge", "--input", str(tmp_path / "p_*"), "--output-prefix", str(tmp_path / "m")]) == 0
    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    assert _decoded(str(tmp_path / "m"), tokenizer) == docs
    merged = IndexedDataset(str(tmp_path / "m"))
    parts = [IndexedDataset(str(tmp_path / f"p_{x}")) for x in "abc"]
    assert len(merged) == sum(map(len, parts)) == len(docs)
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "p_a"), "--samples", "2", "--sample-tokens", "5"]) == 0
    report = capsys.readouterr().out
    lengths = np.array([len(parts[0][i]) for i in range(len(parts[0]))])
    assert f"40 documents, 40 sequences, {lengths.sum()} tokens, dtype uint16" in report
    assert f"max {lengths.max()}" in report and "length histogram" in report
    assert repr(tokenizer.decode(parts[0][0][:5].tolist())) in report  # decoded with the recorded tokenizer
    counts = [int(r.split()[-2]) for r in report.splitlines() if r.startswith("  [")]
    assert sum(counts) == 40
    assert main(["data", "merge", "--input", str(tmp_path / "nothing*"), "--output-prefix", str(tmp_path / "z")]) == 2


def test_blend_counts_are_the_samples_training_sees(tiny_data, tmp_path):
    from megalong.data.datasets import blend_counts, build_gpt_datasets, describe_blend

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    blend = [(3.0, tiny_data.prefix), (1.0, tiny_data.prefix)]
    train, _, _ = build_gpt_datasets(blend, "100,0,0", 16, 1, tokenizer, (200, 0, 0), None)
    counts = blend_counts(train)
    seen = np.bincount([train[i]["dataset_id"] for i in range(len(train))], minlength=2)
    assert [n for _, _, n in counts] == seen.tolist() and sum(seen) == len(train) == 200
    assert [w for _, w, _ in counts] == [0.75, 0.25]
    assert abs(seen[0] - 150) <= 1
    assert describe_blend("train", train) == (f"data: train 200 samples: docs 75.0% -> {seen[0]} samples, "
                                              f"docs 25.0% -> {seen[1]} samples")


def test_tokenizer_samples_every_file(docs, tmp_path):
    from megalong.data.tokenizer_training import train_sentencepiece

    files = _three_files(tmp_path / "in", docs)
    train_sentencepiece(files, str(tmp_path / "t"), vocab_size=600, sample_docs=12, max_doc_chars=2000)
    settings = json.loads((tmp_path / "t.settings.json").read_text())
    assert sum(settings["sampled_per_file"].values()) == 12
    assert all(n > 0 for n in settings["sampled_per_file"].values()), settings["sampled_per_file"]
    assert settings["documents_read"] == len(docs) and settings["memory_bound_chars"] == 24_000
