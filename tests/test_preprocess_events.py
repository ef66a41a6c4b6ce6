"""preprocess reports through typed events: what a run kept, skipped and wrote arrives at the
caller's handler, in order, with the counts the returned stats hold; an exception the handler
raises stops the run and leaves no half-written shard."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megalong.data.corpus import iter_blocks
from megalong.data.preprocess import PreprocessOptions, preprocess
from megalong.data.preprocess_events import (BlockWritten, EmptyInputSkipped, Finished, InputMissing,
                                             Progress, ShardKept, log_event)


def _corpus(root: Path, name: str, n: int) -> str:
    path = root / name
    path.write_text("".join(json.dumps({"text": f"{name} document {i} " + "word " * (i % 50)}) + "\n"
                            for i in range(n)))
    return str(path)


def test_events_follow_the_run(tiny_data, tmp_path):
    a, b = _corpus(tmp_path, "a.jsonl", 300), _corpus(tmp_path, "b.jsonl", 200)
    empty = tmp_path / "c.jsonl"
    empty.write_text("\n\n")
    options = PreprocessOptions([a, b, str(empty), str(tmp_path / "gone.jsonl")], tmp_path / "out" / "p",
                                tiny_data.tokenizer, workers=1, chunk_bytes=1 << 12, on_bad="skip",
                                log_interval=1e-9)
    events: list = []
    stats = preprocess(options, events.append)
    blocks = [e for e in events if isinstance(e, BlockWritten)]
    expected_blocks = sum(1 for f in (a, b, str(empty)) for _ in iter_blocks(f, 1 << 12))
    assert [e.blocks for e in blocks] == list(range(1, expected_blocks + 1))
    assert [e.path for e in blocks] == sorted(e.path for e in blocks)  # file by file, in order
    assert events[0] == InputMissing(str(tmp_path / "gone.jsonl"))
    assert [e for e in events if isinstance(e, EmptyInputSkipped)] == [
        EmptyInputSkipped(f"{empty}: empty: the file holds no documents")]
    assert len([e for e in events if isinstance(e, Progress)]) == expected_blocks  # every block
    last = [e for e in events if isinstance(e, Progress)][-1]
    assert last.documents == stats.documents and last.fraction <= 1.0
    assert events[-1] == Finished(stats) and stats.documents == 500 and stats.bad_lines == 2
    # Run again: both shards are kept (resume); only the empty file, which has no shard, is read again.
    events.clear()
    stats = preprocess(options, events.append)
    assert [e for e in events if isinstance(e, ShardKept)] == [
        ShardKept(a, (str(tmp_path / "out" / "p_a"),)), ShardKept(b, (str(tmp_path / "out" / "p_b"),))]
    assert [e.path for e in events if isinstance(e, BlockWritten)] == [str(empty)]
    assert stats.files_skipped == 2 and stats.files_done == 0


def test_a_handler_that_raises_stops_the_run_cleanly(tiny_data, tmp_path):
    a = _corpus(tmp_path, "a.jsonl", 300)

    def stop_after_two(event):
        if isinstance(event, BlockWritten) and event.blocks == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessOptions(a, tmp_path / "o", tiny_data.tokenizer, workers=2, chunk_bytes=1 << 12),
                   stop_after_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # no shard, no temporary folder


def test_log_event_writes_one_line_per_event(caplog):
    with caplog.at_level(logging.INFO, logger="megalong"):
        log_event(InputMissing("x.jsonl"))
        log_event(BlockWritten(0, "x.jsonl", 1))  # not logged
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "preprocess: x.jsonl: file not found, skipped")]
