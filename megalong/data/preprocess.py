"""`megalong preprocess`: .jsonl/.jsonl.zst files -> megatron-core IndexedDatasets (.bin/.idx).

Outputs. One input file gives OUTPUT_PREFIX.bin/.idx; several give one shard per file,
OUTPUT_PREFIX_<file name without .jsonl/.zst>.bin/.idx. With `split_by_subset` each of those is
split once more by `meta.pile_set_name`: <shard>_<subset>.bin/.idx. Every shard is written into a
temporary folder `.<shard>.tmp/` and renamed to its final names only when its input file is done;
then `<shard>.done.json` records its settings, its documents and the sizes of its files. A run
that is started again skips the shards whose record, settings and file sizes and document counts
all match (`resume`), and redoes the others from the beginning of their file, so an interrupted
run produces the same bytes as an uninterrupted one and never leaves a half-written file under a
final name.

Work. The main process reads each file in blocks of whole lines (`.zst` decompressed as a
stream) and sends them to `workers` processes, which decode, parse, filter, normalise and
tokenize a block at once (batch encoding) and send back one token array per block. Blocks of the
next file are sent while the last ones of a file are still being tokenized, and at most
4 x workers blocks are in flight, so memory is bounded; a document longer than `max_doc_chars`
is tokenized in pieces (`encode_long`), so a single huge document costs a few times its own
size, not the dozens of bytes per token of a Python list.

Bad input (`on_bad`="stop" or "skip"): a line that is not UTF-8 or not JSON, lacks a key or
`meta.pile_set_name` when one is needed, a text with a lone surrogate (valid JSON, not Unicode), a
truncated `.zst`, a missing file, a file without any document (empty): "stop" raises a
CorpusError naming the file and line (the shards finished before are kept; the file being read
leaves nothing, no shard and no done record), "skip" counts it and goes on (a truncated `.zst`
keeps its documents before the damage; an empty file gets no shard). Empty documents follow
`empty_docs`: "keep" (a document of just the end-of-document token), "skip" (counted) or
"stop".

Interface. `preprocess(PreprocessOptions(...), on_event)`: the options are one frozen dataclass
(megalong/data/preprocess_options.py); progress and what is skipped are reported as typed events
(megalong/data/preprocess_events.py) to `on_event`, by default `log_event` (one log line each).
The modules: preprocess_options.py (what to do), preprocess_worker.py (one block -> tokens),
preprocess_shards.py (output names, the temporary folder, done records), preprocess_events.py
(events, stats), this one (reading, the pool, the order of results). A worker that dies (killed,
out of memory) ends the run with a CorpusError naming the file, not a hang.
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import zstandard

from megalong.data.corpus import CorpusError, expand_inputs, iter_blocks
from megalong.data.indexed import token_dtype
from megalong.data.preprocess_events import (BlockWritten, EmptyInputSkipped, EventHandler, Finished,
                                             InputMissing, PreprocessStats, Progress, ShardKept,
                                             StreamDamaged, log_event)
from megalong.data.preprocess_options import PreprocessOptions, Settings
from megalong.data.preprocess_shards import Shard, shard_bases, verified_record
from megalong.data.preprocess_worker import encode_block, init_pool_worker, init_worker

__all__ = ["preprocess", "PreprocessOptions", "PreprocessStats"]


def _start_pool(workers: int, init: tuple) -> ProcessPoolExecutor:
    """`workers` fresh processes (spawned, never forked: a fork copies this process's threads'
    locks, torch's and the tokenizer's own pool, in whatever state they are in, and a worker forked
    from a process that had encoded with threads segfaulted in sentencepiece) running
    `init_pool_worker(*init)`."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=init_pool_worker, initargs=init)


def _ordered(pool, jobs: Iterator, in_flight: int) -> Iterator[tuple]:
    """(tag, result) in job order, at most `in_flight` jobs submitted and not yet consumed. A job
    is (tag, work) where work None passes the tag through (file boundaries, read errors)."""
    pending: collections.deque = collections.deque()
    for tag, work in jobs:
        pending.append((tag, None if work is None else
                        pool.submit(encode_block, work) if pool is not None else work))
        if len(pending) >= in_flight:
            yield _resolve(*pending.popleft(), pool)
    while pending:
        yield _resolve(*pending.popleft(), pool)


def _resolve(tag, result, pool) -> tuple:
    if result is None:
        return tag, None
    return tag, (result.result() if pool is not None else encode_block(result))


def _blocks(todo: list[tuple[str, str]], block_bytes: int, on_bad: str) -> Iterator[tuple]:
    """Jobs for `_ordered`: ("start", i), ("block", i, bytes, position) with the block to encode,
    ("error", i, message) for a truncated file, ("end", i)."""
    for i, (path, _) in enumerate(todo):
        yield ("start", i), None
        line = 1
        try:
            for block, line, position in iter_blocks(path, block_bytes):
                yield ("block", i, len(block), position), (block, line, path)
                line += block.count(b"\n")
        except zstandard.ZstdError as e:
            message = f"{path}: line {line}: truncated or corrupt zstd stream ({e})"
            if on_bad == "stop":
                yield ("error", i, message), None
                return
            yield ("bad", i, message), None
        yield ("end", i), None


def _settings(options: PreprocessOptions, vocab_size: int) -> Settings:
    return Settings(
        tokenizer=os.path.abspath(options.tokenizer_model),
        tokenizer_sha1=hashlib.sha1(Path(options.tokenizer_model).read_bytes()).hexdigest(),
        json_keys=options.json_keys, join_keys=options.join_keys, subsets=options.subsets or None,
        split_by_subset=options.split_by_subset, normalize=options.normalize,
        append_eod=options.append_eod, eod_token=options.eod_token, empty_docs=options.empty_docs,
        dtype=np.dtype(token_dtype(vocab_size)).name)


class _Run:
    """The main side of one run: results in order -> shards, stats and events."""

    def __init__(self, options: PreprocessOptions, todo: list[tuple[str, str]], settings: Settings,
                 stats: PreprocessStats, on_event: EventHandler):
        self.options, self.todo, self.settings, self.stats, self.emit = options, todo, settings, stats, on_event
        self.started = self.last_progress = time.perf_counter()
        self.total_size = max(1, sum(os.path.getsize(p) for p, _ in todo))
        self.done_size = 0
        self.blocks = 0
        self.shard: Optional[Shard] = None

    def handle(self, tag: tuple, result: Optional[dict]) -> None:
        kind, i = tag[0], tag[1]
        path, base = self.todo[i]
        if kind == "start":
            self.shard = Shard(base, path, self.settings)
        elif kind == "error":
            raise CorpusError(tag[2])
        elif kind == "bad":
            self.shard.stats.count_bad(tag[2])
            self.emit(StreamDamaged(tag[2]))
        elif kind == "end":
            self.end_file(path)
        else:
            self.add_block(tag, result, path)

    def end_file(self, path: str) -> None:
        shard = self.shard
        if shard.stats.no_document_lines():
            message = f"{path}: empty: the file holds no documents"
            if self.options.on_bad == "stop":
                raise CorpusError(message)
            self.stats.count_bad(message)
            self.emit(EmptyInputSkipped(message))
            shard.abort()
        else:
            record = shard.commit()
            self.stats.add_shard(shard.stats)
            self.stats.outputs.extend(record["outputs"])
            self.done_size += os.path.getsize(path)
        self.shard = None

    def add_block(self, tag: tuple, result: dict, path: str) -> None:
        shard = self.shard
        _, i, nbytes, shard.position = tag
        shard.stats.bytes += nbytes
        for problem_kind, message in result["problems"]:
            if problem_kind == "empty":
                if self.options.empty_docs == "stop":
                    raise CorpusError(message)
                shard.stats.empty_documents += 1
            elif self.options.on_bad == "stop":
                raise CorpusError(message)
            else:
                shard.stats.count_bad(message)
        shard.stats.filtered += result["filtered"]
        shard.add(result["groups"])
        self.blocks += 1
        self.emit(BlockWritten(i, path, self.blocks))
        now = time.perf_counter()
        if now - self.last_progress >= self.options.log_interval:
            self.last_progress = now
            self.emit(self.progress(i, now))

    def progress(self, index: int, now: float) -> Progress:
        shard, s, total = self.shard, self.shard.stats, self.stats
        return Progress(
            file_index=index, file_count=len(self.todo), path=shard.path,
            file_fraction=min(1.0, shard.position / shard.size), file_seconds=now - shard.started,
            file_documents=s.documents, file_bytes=s.bytes, file_tokens=s.tokens,
            fraction=min(1.0, (self.done_size + shard.position) / self.total_size),
            seconds=now - self.started, documents=total.documents + s.documents,
            bytes=total.bytes + s.bytes, tokens=total.tokens + s.tokens)


def preprocess(options: PreprocessOptions, on_event: EventHandler = log_event) -> PreprocessStats:
    """Tokenize every document of `options.inputs` into megatron .bin/.idx shards (see the module
    docstring for names, resume and bad input); returns counts and rates. Events (a kept shard,
    a skipped input, every block written, progress every `log_interval` seconds, the end) go to
    `on_event`; an exception it raises stops the run like any other (the shard being written is
    removed)."""
    from megalong.data.tokenizer import load_tokenizer

    options.check()
    missing: list[str] = []
    files = expand_inputs(options.inputs, missing=missing if options.on_bad == "skip" else None)
    stats = PreprocessStats()
    for name in missing:
        stats.count_bad(f"{name}: file not found")
        on_event(InputMissing(name))
    if not files:
        raise CorpusError(f"none of the inputs exists: {', '.join(missing)}")
    tokenizer = load_tokenizer(options.tokenizer_model, options.eod_token)
    if options.append_eod:
        tokenizer.eod  # noqa: B018 -- fails early when the tokenizer has none
    settings = _settings(options, tokenizer.vocab_size)
    todo = []
    kept_documents = 0
    for path, base in zip(files, shard_bases(files, options.output_prefix)):
        record = verified_record(base, path, settings, options.on_bad) if options.resume else None
        if record is not None:
            stats.files_skipped += 1
            stats.outputs.extend(record["outputs"])
            kept_documents += sum(info["documents"] for info in record["outputs"].values())
            on_event(ShardKept(path, tuple(record["outputs"])))
        else:
            todo.append((path, base))
    run = _Run(options, todo, settings, stats, on_event)
    workers = options.workers
    # One process: the tokenizer's own threads use every core; a pool: one thread per worker.
    init = (settings, options.max_doc_chars, -1 if workers == 1 else 1, options.word_cache)
    pool = None
    try:
        if workers > 1 and todo:
            pool = _start_pool(workers, init)
        else:
            init_worker(*init)
        for tag, result in _ordered(pool, _blocks(todo, options.chunk_bytes, options.on_bad), 4 * workers):
            run.handle(tag, result)
    except BrokenProcessPool:
        where = run.shard.path if run.shard is not None else "the input"
        if run.shard is not None:
            run.shard.abort()
        raise CorpusError(f"{where}: a preprocess worker process died (killed, or out of memory) while "
                          "tokenizing it; the shards finished before are kept: run the same command "
                          "again to resume") from None
    except BaseException:
        if run.shard is not None:
            run.shard.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.seconds = time.perf_counter() - run.started
    if stats.documents == 0 and kept_documents == 0:
        raise CorpusError(f"{', '.join(files)}: no documents under {'/'.join(options.json_keys)} "
                          f"({stats.bad_lines} bad lines skipped)")
    on_event(Finished(stats))
    return stats
