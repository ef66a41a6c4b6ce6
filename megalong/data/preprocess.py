"""`megalong preprocess`: .jsonl/.jsonl.zst -> megatron-core IndexedDataset (.bin/.idx).

The main process streams raw lines; a pool of workers decodes, parses and tokenizes them in order;
the main process writes tokens with megatron-core's IndexedDatasetBuilder to temporary files that
are renamed to PREFIX.bin/.idx only when everything succeeded. A bad line stops the run with its
file and line (nothing is renamed into place), or is skipped and counted with --skip-bad-lines.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from megalong.data.corpus import CorpusError, RawLine, expand_inputs, iter_raw_lines, parse_line

log = logging.getLogger("megalong")

_worker_tokenizer = None
_worker_key = "text"
_worker_eod: Optional[int] = None


def _init_worker(model_path: str, json_key: str, append_eod: bool) -> None:
    global _worker_tokenizer, _worker_key, _worker_eod
    from megalong.data.tokenizer import SentencePieceTokenizer

    _worker_tokenizer = SentencePieceTokenizer(model_path)
    _worker_key = json_key
    _worker_eod = _worker_tokenizer.eod if append_eod else None


def _encode_chunk(lines: list[RawLine]) -> list[tuple[Optional[list[int]], int, Optional[str]]]:
    """(tokens, bytes, None) per good line, (None, bytes, error message) per bad one."""
    texts, out = [], []
    for line in lines:
        try:
            texts.append(parse_line(line, _worker_key))
            out.append((None, len(line.data), None))
        except CorpusError as e:
            out.append((None, len(line.data), str(e)))
    encoded = iter(_worker_tokenizer.encode_batch(texts)) if texts else iter(())
    result = []
    for tokens, size, error in out:
        if error is None:
            tokens = next(encoded)
            if _worker_eod is not None:
                tokens.append(_worker_eod)
        result.append((tokens, size, error))
    return result


def _chunks(lines: Iterator[RawLine], size: int) -> Iterator[list[RawLine]]:
    while chunk := list(islice(lines, size)):
        yield chunk


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bad_lines: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        return (f"{self.documents} documents, {self.tokens} tokens, {self.bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s ({self.documents / max(self.seconds, 1e-9):,.0f} docs/s, "
                f"{rate:.2f} MB/s); {self.bad_lines} bad lines skipped")


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(inputs: Iterable[str], output_prefix: str, tokenizer_model: str, json_key: str = "text",
               workers: int = 2, append_eod: bool = True, skip_bad_lines: bool = False,
               chunk_size: int = 64, progress: bool = True) -> PreprocessStats:
    """Tokenize every document of the inputs into PREFIX.bin/.idx; returns counts and rates."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megalong.data.tokenizer import SentencePieceTokenizer

    files = expand_inputs(inputs)
    vocab = SentencePieceTokenizer(tokenizer_model).vocab_size
    total_bytes = sum(os.path.getsize(f) for f in files)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = out.with_name(f".{out.name}.bin.tmp"), out.with_name(f".{out.name}.idx.tmp")
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=token_dtype(vocab))
    stats = PreprocessStats()
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", mininterval=1.0,
                   disable=None)
    init = (tokenizer_model, json_key, append_eod)
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, init) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(*init)
            results = map(_encode_chunk, _chunks(iter_raw_lines(files), chunk_size))
        else:
            results = pool.imap(_encode_chunk, _chunks(iter_raw_lines(files), chunk_size))
        for chunk in results:
            for tokens, size, error in chunk:
                stats.bytes += size
                if error is not None:
                    if not skip_bad_lines:
                        raise CorpusError(error)
                    stats.bad_lines += 1
                    continue
                builder.add_document(tokens, [len(tokens)])
                stats.documents += 1
                stats.tokens += len(tokens)
            if bar is not None:
                bar.n = min(stats.bytes, total_bytes)  # raw bytes; compressed inputs run ahead of it
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix({"docs/s": f"{stats.documents / elapsed:,.0f}",
                                 "MB/s": f"{stats.bytes / 1e6 / elapsed:.2f}"}, refresh=False)
                bar.update(0)
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            path.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
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
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--no-append-eod", action="store_true", help="do not end documents with EOD")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count lines that are not UTF-8/JSON or lack the key, instead of stopping")


def run_preprocess(args: argparse.Namespace) -> Optional[int]:
    preprocess(args.input, args.output_prefix, args.tokenizer_model, args.json_key, args.workers,
               append_eod=not args.no_append_eod, skip_bad_lines=args.skip_bad_lines)
    return 0
