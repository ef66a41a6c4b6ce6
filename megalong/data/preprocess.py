"""`megalong preprocess`: .jsonl/.jsonl.zst -> megatron-core IndexedDataset (PREFIX.bin/.idx).

The main process streams raw lines in chunks to a pool of workers (each loads the SentencePiece
model once) that decode, parse and tokenize them; results come back in input order and the main
process appends one megatron document per input document with megatron-core's
IndexedDatasetBuilder. At most a few chunks per worker are in flight, so memory stays bounded.
Output goes to temporary names that are renamed to PREFIX.bin/.idx only when everything
succeeded: a bad line (reported with its file and line) or a crash leaves no file under the
final names. With skip_bad_lines, bad lines are counted instead.
"""
from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, RawLine, expand_inputs, iter_raw_lines, parse_line

log = logging.getLogger("megalong")

_worker: dict = {}  # per worker process: tokenizer, json_key, eod, dtype, threads


def _init_worker(model_path: str, json_key: str, append_eod: bool, dtype: str, threads: int) -> None:
    from megalong.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(model_path)
    _worker.update(tokenizer=tokenizer, json_key=json_key, dtype=np.dtype(dtype), threads=threads,
                   eod=tokenizer.eod if append_eod else None)


def _encode_chunk(lines: list[RawLine]) -> list[tuple[Optional[np.ndarray], int, Optional[str]]]:
    """Per line: (tokens, raw bytes, None), or (None, raw bytes, error message) for a bad line."""
    texts, parsed = [], []
    for line in lines:
        try:
            texts.append(parse_line(line, _worker["json_key"]))
            parsed.append(None)
        except CorpusError as e:
            parsed.append(str(e))
    encoded = iter(_worker["tokenizer"].encode_batch(texts, _worker["threads"]) if texts else ())
    out = []
    for line, error in zip(lines, parsed):
        if error is not None:
            out.append((None, len(line.data), error))
            continue
        tokens = next(encoded)
        if _worker["eod"] is not None:
            tokens.append(_worker["eod"])
        out.append((np.asarray(tokens, dtype=_worker["dtype"]), len(line.data), None))
    return out


def _chunks(lines: Iterator[RawLine], max_lines: int, max_bytes: int) -> Iterator[list[RawLine]]:
    """Runs of lines, cut at max_lines or once max_bytes are reached (big documents balance)."""
    chunk, size = [], 0
    for line in lines:
        chunk.append(line)
        size += len(line.data)
        if len(chunk) >= max_lines or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_results(pool, chunks: Iterator[list[RawLine]], in_flight: int) -> Iterator[list]:
    """pool.imap with back-pressure: at most `in_flight` chunks submitted and not yet consumed."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # raw (decompressed) JSON bytes read
    bad_lines: int = 0
    seconds: float = 0.0
    bad_examples: list[str] = field(default_factory=list)

    def rates(self, seconds: Optional[float] = None) -> str:
        s = max(self.seconds if seconds is None else seconds, 1e-9)
        return f"{self.documents / s:,.0f} docs/s, {self.bytes / 1e6 / s:.2f} MB/s"

    def __str__(self) -> str:
        text = (f"{self.documents} documents, {self.tokens} tokens, {self.bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s ({self.rates()})")
        if self.bad_lines:
            text += f"; {self.bad_lines} bad lines skipped, e.g. {self.bad_examples[0]}"
        return text


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def _progress_bar(total_bytes: Optional[int], enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs get the periodic line instead).
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", mininterval=1.0,
                disable=None)


def preprocess(inputs: Iterable[str] | str, output_prefix: str | Path, tokenizer_model: str | Path,
               json_key: str = "text", workers: int = 2, append_eod: bool = True,
               skip_bad_lines: bool = False, log_every: int = 10_000, chunk_size: int = 64,
               chunk_bytes: int = 1 << 18, progress: bool = True) -> PreprocessStats:
    """Tokenize every document of `inputs` into OUTPUT_PREFIX.bin/.idx (one megatron document
    per input document, ending with the tokenizer's `eod` when append_eod); returns counts and
    rates. A log line with docs/s and MB/s every `log_every` documents (0: none)."""
    from megalong.data.tokenizer import SentencePieceTokenizer

    if workers < 1:
        raise ConfigError(f"workers (--workers): expected at least 1, got {workers}")
    if not Path(tokenizer_model).is_file():
        raise ConfigError(f"tokenizer_model (--tokenizer-model): {tokenizer_model} not found")
    files = expand_inputs(inputs)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # slow import: after the checks

    vocab = SentencePieceTokenizer(tokenizer_model).vocab_size
    dtype = token_dtype(vocab)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out.with_name(f".{out.name}.bin.tmp{os.getpid()}")
    tmp_idx = out.with_name(f".{out.name}.idx.tmp{os.getpid()}")
    stats = PreprocessStats()
    started = time.perf_counter()
    next_log = log_every
    # One process: SentencePiece's own threads use every core; a pool: one thread per worker.
    init = (str(tokenizer_model), json_key, append_eod, np.dtype(dtype).name, -1 if workers == 1 else 1)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    # The bar counts raw JSON bytes, so it knows its total only for uncompressed inputs.
    compressed = any(f.endswith(".zst") for f in files)
    total_bytes = None if compressed else sum(os.path.getsize(f) for f in files)
    bar = _progress_bar(total_bytes, progress)
    pool = None
    try:
        if workers > 1:
            # fork where it is safe (Linux): workers start at once, without re-importing megalong.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = context.Pool(workers, _init_worker, init)
        chunks = _chunks(iter_raw_lines(files), chunk_size, chunk_bytes)
        if pool is None:
            _init_worker(*init)
            results = map(_encode_chunk, chunks)
        else:
            results = _ordered_results(pool, chunks, in_flight=4 * workers)
        for chunk in results:
            for tokens, size, error in chunk:
                stats.bytes += size
                if error is not None:
                    if not skip_bad_lines:
                        raise CorpusError(error)
                    stats.bad_lines += 1
                    if len(stats.bad_examples) < 5:
                        stats.bad_examples.append(error)
                    continue
                builder.add_document(tokens, [len(tokens)])
                stats.documents += 1
                stats.tokens += len(tokens)
            elapsed = time.perf_counter() - started
            if bar is not None:
                bar.n = stats.bytes if bar.total is None else min(stats.bytes, bar.total)
                bar.set_postfix_str(stats.rates(elapsed), refresh=False)
                bar.update(0)
            if log_every and stats.documents >= next_log:
                next_log = (stats.documents // log_every + 1) * log_every
                log.info("preprocess: %d documents, %.1f MB (%s)", stats.documents,
                         stats.bytes / 1e6, stats.rates(elapsed))
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            path.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    if stats.documents == 0:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise CorpusError(f"{', '.join(files)}: no documents under '{json_key}' "
                          f"({stats.bad_lines} bad lines skipped)")
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    stats.seconds = time.perf_counter() - started
    log.info("preprocess: %s -> %s.bin/.idx", stats, out)
    return stats


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    parser.add_argument("--json-key", default="text", help="the key holding the document text")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2))),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end documents with EOD")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count lines that are not UTF-8/JSON or lack the key, "
                             "instead of stopping")
    parser.add_argument("--log-every", type=int, default=10_000, help="a progress line every N documents")


def run_preprocess(args: argparse.Namespace) -> int:
    preprocess(args.input, args.output_prefix, args.tokenizer_model, args.json_key, args.workers,
               append_eod=not args.no_append_eod, skip_bad_lines=args.skip_bad_lines,
               log_every=args.log_every)
    return 0
