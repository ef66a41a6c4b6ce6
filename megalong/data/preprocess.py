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
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import zstandard

from megalong.argtypes import int_at_least, number_in, positive_int
from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, expand_inputs, iter_blocks, lone_surrogate
from megalong.data.indexed import ShardWriter, read_header, token_dtype
from megalong.paths import check_output_prefix

log = logging.getLogger("megalong")

try:  # a faster JSON parser when installed; json gives the same results and the error messages
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

BAD_POLICIES = ("stop", "skip")
EMPTY_POLICIES = ("keep", "skip", "stop")
NORMALIZATIONS = (None, "nfkc", "ftfy")
DONE_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """Everything that decides the bytes of an output (recorded in every <shard>.done.json)."""

    tokenizer: str
    tokenizer_sha1: str
    json_keys: tuple[str, ...] = ("text",)
    join_keys: str = "\n\n"
    subsets: Optional[tuple[str, ...]] = None  # keep only these meta.pile_set_name values
    split_by_subset: bool = False
    normalize: Optional[str] = None
    append_eod: bool = True
    eod_token: Optional[str] = None
    empty_docs: str = "keep"
    dtype: str = "uint16"

    def digest(self) -> str:
        """Of everything but the tokenizer's path (its content is in tokenizer_sha1)."""
        fields = {k: v for k, v in asdict(self).items() if k != "tokenizer"}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # raw (decompressed) JSON bytes read
    bad_lines: int = 0  # bad lines, truncated files and missing files skipped
    empty_documents: int = 0  # empty documents skipped (empty_docs="skip")
    filtered: int = 0  # documents of subsets not asked for
    files_done: int = 0
    files_skipped: int = 0  # done before, verified and kept (resume)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # every prefix written or kept
    bad_examples: list[str] = field(default_factory=list)

    def count_bad(self, message: str) -> None:
        self.bad_lines += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(message)

    def rates(self, seconds: Optional[float] = None) -> str:
        s = max(self.seconds if seconds is None else seconds, 1e-9)
        return (f"{self.documents / s:,.0f} docs/s, {self.bytes / 1e6 / s:.2f} MB/s, "
                f"{self.tokens / s:,.0f} tokens/s")

    def __str__(self) -> str:
        text = (f"{self.documents} documents, {self.tokens} tokens, {self.bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s ({self.rates()}); {self.files_done} files done, "
                f"{self.files_skipped} kept from before")
        if self.filtered:
            text += f"; {self.filtered} documents of other subsets left out"
        if self.empty_documents:
            text += f"; {self.empty_documents} empty documents skipped"
        if self.bad_lines:
            text += f"; {self.bad_lines} bad lines skipped, e.g. {self.bad_examples[0]}"
        return text


# -- the worker side: one block of lines -> tokens -------------------------------------------------

_worker: dict = {}


WORD_CACHE_CHECK_CHARS = 200_000  # characters per worker encoded both ways
WORD_CACHE_WORDS = 200_000  # words remembered per worker (a few tens of MB)


def _encode_texts(texts: list[str]) -> list[list[int]]:
    tokenizer, cache = _worker["tokenizer"], _worker["cache"]
    if cache is None:
        return tokenizer.encode_batch(texts, _worker["threads"])
    try:
        encoded = tokenizer.encode_batch_words(texts, cache, WORD_CACHE_WORDS)
    except ValueError as e:
        encoded = None
        reason = str(e)
    if encoded is not None and _worker["to_check"] > 0:
        check = [i for i, t in enumerate(texts) if len(t) <= _worker["to_check"]][:8]
        _worker["to_check"] -= sum(len(texts[i]) for i in check)
        if tokenizer.encode_batch([texts[i] for i in check], 1) != [encoded[i] for i in check]:
            encoded, reason = None, "a document's tokens differ from the plain encoding"
    if encoded is None:
        log.warning("preprocess: word cache turned off (%s)", reason)
        _worker["cache"] = None
        return tokenizer.encode_batch(texts, _worker["threads"])
    return encoded


def _init_worker(settings: Settings, max_doc_chars: int, threads: int, word_cache: bool = True) -> None:
    from megalong.data.tokenizer import load_tokenizer

    if threads == 1:
        os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers: one thread per worker process
    tokenizer = load_tokenizer(settings.tokenizer, settings.eod_token)
    fix = None
    if settings.normalize == "ftfy":
        import ftfy

        fix = ftfy.fix_text
    elif settings.normalize == "nfkc":
        fix = lambda text: unicodedata.normalize("NFKC", text)  # noqa: E731
    # SentencePiece BPE: words are encoded once and remembered (exact; checked on the first
    # documents of every worker against the plain encoding, and dropped if they ever differ).
    cache = {} if getattr(tokenizer, "word_local", False) and word_cache else None
    _worker.update(tokenizer=tokenizer, settings=settings, fix=fix, max_doc_chars=max_doc_chars,
                   cache=cache, to_check=WORD_CACHE_CHECK_CHARS,
                   threads=threads, dtype=np.dtype(settings.dtype),
                   eod=tokenizer.eod if settings.append_eod else None,
                   subsets=set(settings.subsets) if settings.subsets else None)


class _Skip(Exception):
    """A line that is not a document (kind: 'bad', 'empty' or 'filtered')."""

    def __init__(self, kind: str, message: str = ""):
        super().__init__(message)
        self.kind = kind


def _parse(data: bytes, line_number: int, where: str) -> tuple[str, str]:
    """(text, subset) of one line; raises _Skip."""
    s: Settings = _worker["settings"]
    record = None
    if orjson is not None:
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            record = None
    if record is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("bad", f"{where}: line {line_number}: not valid UTF-8 ({e.reason} at byte {e.start})")
        if line_number == 1:
            text = text.lstrip("\ufeff")  # a byte-order mark some editors write
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Skip("bad", f"{where}: line {line_number}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        raise _Skip("bad", f"{where}: line {line_number}: not a JSON object")
    subset = ""
    if s.subsets or s.split_by_subset:
        meta = record.get("meta")
        subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
        if not isinstance(subset, str):
            raise _Skip("bad", f"{where}: line {line_number}: no 'meta.pile_set_name' in this record")
        if _worker["subsets"] is not None and subset not in _worker["subsets"]:
            raise _Skip("filtered")
    values = []
    for key in s.json_keys:
        if key not in record:
            raise _Skip("bad", f"{where}: line {line_number}: no '{key}' key in this record")
        value = record[key]
        if not isinstance(value, str):
            raise _Skip("bad", f"{where}: line {line_number}: '{key}' is not a string but "
                               f"{type(value).__name__}")
        problem = lone_surrogate(value, data)
        if problem is not None:
            raise _Skip("bad", f"{where}: line {line_number}: '{key}' holds {problem}")
        values.append(value)
    text = values[0] if len(values) == 1 else s.join_keys.join(values)
    if _worker["fix"] is not None:
        text = _worker["fix"](text)
    if not text:
        if s.empty_docs != "keep":
            raise _Skip("empty", f"{where}: line {line_number}: empty document")
    return text, subset if s.split_by_subset else ""


def _encode_block(job: tuple[bytes, int, str]) -> dict:
    """Parse and tokenize one block of lines. Returns per output subset (concatenated tokens,
    lengths) in input order, and the lines that were skipped with their reasons."""
    block, first_line, where = job
    from megalong.data.tokenizer import encode_long

    tokenizer, dtype, eod = _worker["tokenizer"], _worker["dtype"], _worker["eod"]
    max_chars = _worker["max_doc_chars"]
    texts, subsets, problems = [], [], []
    filtered = 0
    for i, data in enumerate(block.split(b"\n")):
        if not data.strip():
            continue
        try:
            text, subset = _parse(data, first_line + i, where)
        except _Skip as e:
            if e.kind == "filtered":
                filtered += 1
            else:
                problems.append((e.kind, str(e)))
            continue
        texts.append(text)
        subsets.append(subset)
    del block
    extra = 1 if eod is not None else 0
    arrays: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    short = [i for i, t in enumerate(texts) if len(t) <= max_chars]
    if short:
        encoded = _encode_texts([texts[i] for i in short])
        for i, ids in zip(short, encoded):
            arrays[i] = np.asarray(ids, dtype=dtype)
        del encoded
    for i, text in enumerate(texts):
        if arrays[i] is None:
            arrays[i] = encode_long(tokenizer, text, max_chars, dtype, lambda t: _encode_texts([t])[0])
            texts[i] = ""  # free the text as soon as it is encoded
    del texts
    groups: dict[str, tuple[list, list]] = {}
    for ids, subset in zip(arrays, subsets):
        parts, lengths = groups.setdefault(subset, ([], []))
        parts.append(ids)
        if eod is not None:
            parts.append(np.array([eod], dtype=dtype))
        lengths.append(len(ids) + extra)
    out = {subset: (np.concatenate(parts) if parts else np.zeros(0, dtype), np.asarray(lengths, np.int32))
           for subset, (parts, lengths) in groups.items()}
    return {"groups": out, "problems": problems, "filtered": filtered}


# -- the main side ---------------------------------------------------------------------------------

def _ordered(pool, jobs: Iterator, in_flight: int) -> Iterator[tuple]:
    """(tag, result) in job order, at most `in_flight` jobs submitted and not yet consumed. A job
    is (tag, work) where work None passes the tag through (file boundaries, read errors)."""
    pending: collections.deque = collections.deque()
    for tag, work in jobs:
        pending.append((tag, None if work is None else
                        pool.apply_async(_encode_block, (work,)) if pool is not None else work))
        if len(pending) >= in_flight:
            yield _resolve(*pending.popleft(), pool)
    while pending:
        yield _resolve(*pending.popleft(), pool)


def _resolve(tag, result, pool) -> tuple:
    if result is None:
        return tag, None
    return tag, (result.get() if pool is not None else _encode_block(result))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "none"


def _file_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".zst", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _safe_name(name)


def shard_bases(files: list[str], output_prefix: str) -> list[str]:
    """The output base of every input file (see the module docstring)."""
    if len(files) == 1:
        return [output_prefix]
    stems = [_file_stem(f) for f in files]
    bases = []
    for i, stem in enumerate(stems):
        if stems.count(stem) > 1:
            stem = f"{i:05d}_{stem}"
        bases.append(f"{output_prefix}_{stem}")
    return bases


def _done_path(base: str) -> Path:
    return Path(f"{base}.done.json")


def _verified(base: str, path: str, settings: Settings, on_bad: str) -> Optional[dict]:
    """The done record of a shard if it is complete and made with these settings, else None."""
    try:
        record = json.loads(_done_path(base).read_text())
        if (record["version"] != DONE_VERSION or record["settings_digest"] != settings.digest()
                or record["input_size"] != os.path.getsize(path)):
            return None
        if on_bad == "stop" and record["stats"]["bad_lines"]:
            return None  # made by skipping bad lines, and now they must stop the run
        for prefix, info in record["outputs"].items():
            if (os.path.getsize(f"{prefix}.bin") != info["bin_bytes"]
                    or os.path.getsize(f"{prefix}.idx") != info["idx_bytes"]
                    or read_header(f"{prefix}.idx")[2] != info["documents"]):
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Shard:
    """The outputs of one input file, written under `.<base>.tmp/` until `commit`."""

    def __init__(self, base: str, path: str, settings: Settings):
        self.base, self.path, self.settings = base, path, settings
        self.tmp = Path(base).with_name(f".{Path(base).name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)  # a killed run's leftovers
        self.tmp.mkdir(parents=True)
        self.writers: dict[str, ShardWriter] = {}
        self.stats = PreprocessStats()
        self.started = time.perf_counter()
        self.position = 0
        self.size = max(1, os.path.getsize(path))

    def prefix(self, subset: str) -> str:
        return self.base if not self.settings.split_by_subset else f"{self.base}_{_safe_name(subset)}"

    def add(self, groups: dict) -> None:
        for subset, (tokens, lengths) in groups.items():
            writer = self.writers.get(subset)
            if writer is None:
                writer = self.writers[subset] = ShardWriter(self.tmp / Path(self.prefix(subset)).name,
                                                            self.settings.dtype)
            writer.add(tokens, lengths)
            self.stats.documents += len(lengths)
            self.stats.tokens += len(tokens)

    def commit(self) -> dict:
        if not self.writers and not self.settings.split_by_subset:
            self.writers[""] = ShardWriter(self.tmp / Path(self.base).name, self.settings.dtype)
        outputs = {}
        for subset, writer in sorted(self.writers.items()):
            writer.finish()
            prefix = self.prefix(subset)
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".bin", ".idx"):
                os.replace(f"{writer.path}{suffix}", f"{prefix}{suffix}")
            outputs[prefix] = {"subset": subset or None, "documents": writer.documents,
                               "tokens": writer.tokens, "bin_bytes": os.path.getsize(f"{prefix}.bin"),
                               "idx_bytes": os.path.getsize(f"{prefix}.idx")}
        s = self.stats
        record = {"version": DONE_VERSION, "input": os.path.abspath(self.path),
                  "input_size": os.path.getsize(self.path), "settings_digest": self.settings.digest(),
                  "settings": asdict(self.settings), "outputs": outputs,
                  "stats": {"documents": s.documents, "tokens": s.tokens, "bytes": s.bytes,
                            "bad_lines": s.bad_lines, "empty_documents": s.empty_documents,
                            "filtered": s.filtered, "bad_examples": s.bad_examples}}
        tmp_record = self.tmp / "done.json"
        tmp_record.write_text(json.dumps(record, indent=1))
        os.replace(tmp_record, _done_path(self.base))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return record

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


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


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _check_options(workers: int, on_bad: str, empty_docs: str, normalize: Optional[str],
                   json_keys: tuple[str, ...], max_doc_chars: int) -> None:
    if workers < 1:
        raise ConfigError(f"workers (--workers): expected at least 1, got {workers}")
    if on_bad not in BAD_POLICIES:
        raise ConfigError(f"on_bad (--on-bad-input): expected one of {BAD_POLICIES}, got {on_bad!r}")
    if empty_docs not in EMPTY_POLICIES:
        raise ConfigError(f"empty_docs (--empty-docs): expected one of {EMPTY_POLICIES}, got {empty_docs!r}")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize (--normalize): expected nfkc or ftfy, got {normalize!r}")
    if normalize == "ftfy":
        try:
            import ftfy  # noqa: F401
        except ImportError:
            raise ConfigError("normalize (--normalize): ftfy is not installed (pip install ftfy)") from None
    if not json_keys:
        raise ConfigError("json_key (--json-key): at least one key is needed")
    if max_doc_chars < 1000:
        raise ConfigError(f"max_doc_chars (--max-doc-chars): expected at least 1000, got {max_doc_chars}")


def preprocess(inputs: Iterable[str] | str, output_prefix: str | Path, tokenizer_model: str | Path,
               json_key: str | Iterable[str] = "text", workers: int = 2, append_eod: bool = True,
               skip_bad_lines: bool = False, log_interval: float = 10.0, chunk_bytes: int = 1 << 20,
               progress: bool = True, *, on_bad: Optional[str] = None, empty_docs: str = "keep",
               subsets: Optional[Iterable[str]] = None, split_by_subset: bool = False,
               normalize: Optional[str] = None, join_keys: str = "\n\n", eod_token: Optional[str] = None,
               resume: bool = True, max_doc_chars: int = 1_000_000,
               word_cache: bool = True) -> PreprocessStats:
    """Tokenize every document of `inputs` (files and globs) into megatron .bin/.idx shards (see
    the module docstring for names, resume and bad input); returns counts and rates. Several
    `json_key`s are joined with `join_keys`. `skip_bad_lines` is on_bad="skip". `word_cache`:
    let SentencePiece BPE models remember the tokens of words (same output, faster). A progress line
    (per file and overall: docs/s, MB/s, tokens/s, ETA) every `log_interval` seconds when `progress`."""
    from megalong.data.tokenizer import load_tokenizer

    on_bad = on_bad or ("skip" if skip_bad_lines else "stop")
    json_keys = (json_key,) if isinstance(json_key, str) else tuple(json_key)
    _check_options(workers, on_bad, empty_docs, normalize, json_keys, max_doc_chars)
    if Path(tokenizer_model).is_dir():
        raise ConfigError(f"tokenizer_model (--tokenizer-model): {tokenizer_model} is a directory, "
                          f"not a tokenizer file (.model or tokenizer.json)")
    if not Path(tokenizer_model).is_file():
        raise ConfigError(f"tokenizer_model (--tokenizer-model): {tokenizer_model} not found")
    check_output_prefix(output_prefix, "output_prefix (--output-prefix)")
    missing: list[str] = []
    files = expand_inputs(inputs, missing=missing if on_bad == "skip" else None)
    stats = PreprocessStats()
    for name in missing:
        stats.count_bad(f"{name}: file not found")
        log.warning("preprocess: %s: file not found, skipped", name)
    if not files:
        raise CorpusError(f"none of the inputs exists: {', '.join(missing)}")
    tokenizer = load_tokenizer(tokenizer_model, eod_token)
    if append_eod:
        tokenizer.eod  # noqa: B018 -- fails early when the tokenizer has none
    settings = Settings(
        tokenizer=os.path.abspath(tokenizer_model),
        tokenizer_sha1=hashlib.sha1(Path(tokenizer_model).read_bytes()).hexdigest(),
        json_keys=json_keys, join_keys=join_keys, subsets=tuple(sorted(subsets)) if subsets else None,
        split_by_subset=split_by_subset, normalize=normalize, append_eod=append_eod, eod_token=eod_token,
        empty_docs=empty_docs, dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name)
    bases = shard_bases(files, str(output_prefix))
    todo = []
    kept_documents = 0
    for path, base in zip(files, bases):
        record = _verified(base, path, settings, on_bad) if resume else None
        if record is not None:
            stats.files_skipped += 1
            stats.outputs.extend(record["outputs"])
            kept_documents += sum(info["documents"] for info in record["outputs"].values())
            log.info("preprocess: %s is done already (%s), kept", path, ", ".join(record["outputs"]))
        else:
            todo.append((path, base))
    started = time.perf_counter()
    total_size = max(1, sum(os.path.getsize(p) for p, _ in todo))
    done_size = 0
    die_after = int(os.environ.get("MEGALONG_TEST_DIE_AFTER_BLOCKS", "0"))  # tests: a killed run
    # One process: the tokenizer's own threads use every core; a pool: one thread per worker.
    init = (settings, max_doc_chars, -1 if workers == 1 else 1, word_cache)
    pool = None
    shard: Optional[_Shard] = None
    last_log = started
    blocks_written = 0
    try:
        if workers > 1 and todo:
            # fork where it is safe (Linux): workers start at once, without re-importing megalong.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = context.Pool(workers, _init_worker, init)
        else:
            _init_worker(*init)
        for tag, result in _ordered(pool, _blocks(todo, chunk_bytes, on_bad), 4 * workers):
            kind, i = tag[0], tag[1]
            path, base = todo[i]
            if kind == "start":
                shard = _Shard(base, path, settings)
            elif kind == "error":
                raise CorpusError(tag[2])
            elif kind == "bad":
                shard.stats.count_bad(tag[2])
                log.warning("preprocess: %s (the documents before it are kept)", tag[2])
            elif kind == "end" and _no_document_lines(shard.stats):
                message = f"{path}: empty: the file holds no documents"
                if on_bad == "stop":
                    raise CorpusError(message)
                stats.count_bad(message)
                log.warning("preprocess: %s, skipped", message)
                shard.abort()
                shard = None
            elif kind == "end":
                record = shard.commit()
                for key in ("bad_lines", "empty_documents", "filtered"):
                    setattr(stats, key, getattr(stats, key) + getattr(shard.stats, key))
                stats.bad_examples = (stats.bad_examples + shard.stats.bad_examples)[:5]
                stats.documents += shard.stats.documents
                stats.tokens += shard.stats.tokens
                stats.bytes += shard.stats.bytes
                stats.files_done += 1
                stats.outputs.extend(record["outputs"])
                done_size += os.path.getsize(path)
                shard = None
            else:  # a block
                _, _, nbytes, shard.position = tag
                shard.stats.bytes += nbytes
                for problem_kind, message in result["problems"]:
                    if problem_kind == "empty":
                        if empty_docs == "stop":
                            raise CorpusError(message)
                        shard.stats.empty_documents += 1
                    elif on_bad == "stop":
                        raise CorpusError(message)
                    else:
                        shard.stats.count_bad(message)
                shard.stats.filtered += result["filtered"]
                shard.add(result["groups"])
                blocks_written += 1
                if die_after and blocks_written >= die_after:
                    os.kill(os.getpid(), 9)
                now = time.perf_counter()
                if progress and now - last_log >= log_interval:
                    last_log = now
                    _log_progress(shard, stats, now - started, done_size, total_size, i, len(todo))
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.seconds = time.perf_counter() - started
    if stats.documents == 0 and kept_documents == 0:
        raise CorpusError(f"{', '.join(files)}: no documents under {'/'.join(json_keys)} "
                          f"({stats.bad_lines} bad lines skipped)")
    log.info("preprocess: %s -> %s", stats, ", ".join(f"{p}.bin/.idx" for p in stats.outputs[:8])
             + (f" and {len(stats.outputs) - 8} more" if len(stats.outputs) > 8 else ""))
    return stats


def _no_document_lines(s: PreprocessStats) -> bool:
    """A file that held no document at all, not even a bad, empty or filtered one."""
    return s.documents == s.bad_lines == s.empty_documents == s.filtered == 0


def _log_progress(shard: _Shard, stats: PreprocessStats, elapsed: float, done_size: int,
                  total_size: int, index: int, count: int) -> None:
    s = shard.stats
    file_elapsed = time.perf_counter() - shard.started
    file_frac = min(1.0, shard.position / shard.size)
    all_frac = min(1.0, (done_size + shard.position) / total_size)
    file_eta = file_elapsed * (1 - file_frac) / max(file_frac, 1e-9)
    all_eta = elapsed * (1 - all_frac) / max(all_frac, 1e-9)
    docs, nbytes, tokens = stats.documents + s.documents, stats.bytes + s.bytes, stats.tokens + s.tokens
    log.info("preprocess: file %d/%d %s %.0f%% (%s, ETA %s) | all %.0f%%: %d docs, %s docs/s, "
             "%.2f MB/s, %s tokens/s, ETA %s", index + 1, count, os.path.basename(shard.path),
             100 * file_frac, s.rates(file_elapsed), _fmt_time(file_eta), 100 * all_frac, docs,
             f"{docs / elapsed:,.0f}", nbytes / 1e6 / elapsed, f"{tokens / elapsed:,.0f}", _fmt_time(all_eta))


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--output-prefix", required=True,
                        help="one input: PREFIX.bin/.idx; several: PREFIX_<file name>.bin/.idx each")
    parser.add_argument("--tokenizer-model", required=True,
                        help="SentencePiece .model or Hugging Face tokenizer.json")
    parser.add_argument("--json-key", nargs="+", default=["text"],
                        help="the key(s) holding the document text; several are joined with --join-keys")
    parser.add_argument("--join-keys", default="\n\n", help="separator between several keys' texts")
    parser.add_argument("--workers", type=positive_int, default=max(1, min(8, (os.cpu_count() or 2))),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end documents with EOD")
    parser.add_argument("--eod-token", default=None,
                        help="tokenizer.json only: the end-of-document token (default: </s>, "
                             "<|endoftext|>, ... whichever the vocabulary has)")
    parser.add_argument("--on-bad-input", choices=BAD_POLICIES, default=None,
                        help="a line that is not UTF-8/JSON or lacks a key, a truncated .zst, a missing "
                             "file: stop with the file and line (default) or skip and count")
    parser.add_argument("--skip-bad-lines", action="store_true", help="the same as --on-bad-input skip")
    parser.add_argument("--empty-docs", choices=EMPTY_POLICIES, default="keep",
                        help="empty documents: keep (just EOD, default), skip and count, or stop")
    parser.add_argument("--subsets", nargs="+", default=None,
                        help="keep only documents whose meta.pile_set_name is one of these")
    parser.add_argument("--split-by-subset", action="store_true",
                        help="one dataset per meta.pile_set_name: <shard>_<subset>.bin/.idx")
    parser.add_argument("--normalize", choices=("nfkc", "ftfy"), default=None,
                        help="NFKC normalisation, or ftfy.fix_text (needs ftfy installed)")
    parser.add_argument("--no-resume", action="store_true",
                        help="redo every shard, also those recorded as done")
    parser.add_argument("--max-doc-chars", type=int_at_least(1000), default=1_000_000,
                        help="longer documents are tokenized in pieces of about this many characters")
    parser.add_argument("--log-interval", type=number_in(0, low_open=True), default=10.0,
                        help="seconds between progress lines")


def run_preprocess(args: argparse.Namespace) -> int:
    preprocess(args.input, args.output_prefix, args.tokenizer_model, args.json_key, args.workers,
               append_eod=not args.no_append_eod, log_interval=args.log_interval,
               on_bad=args.on_bad_input or ("skip" if args.skip_bad_lines else "stop"),
               empty_docs=args.empty_docs, subsets=args.subsets, split_by_subset=args.split_by_subset,
               normalize=args.normalize, join_keys=args.join_keys, eod_token=args.eod_token,
               resume=not args.no_resume, max_doc_chars=args.max_doc_chars)
    return 0
