"""The worker side of `preprocess`: one block of JSON lines -> per output subset, the tokens and
document lengths, and the lines skipped with their reasons. Runs in each pool process (state in
`_worker`, set by `init_worker`), or in the main process with one worker."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import unicodedata

import numpy as np

from megalong.data.corpus import lone_surrogate
from megalong.data.preprocess_options import Settings

log = logging.getLogger("megalong")

try:  # a faster JSON parser when installed; json gives the same results and the error messages
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

WORD_CACHE_CHECK_CHARS = 200_000  # characters per worker encoded both ways
WORD_CACHE_WORDS = 200_000  # words remembered per worker (a few tens of MB)

_worker: dict = {}


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
        # In a pool process: logged there, not an event of the main process.
        log.warning("preprocess: word cache turned off (%s)", reason)
        _worker["cache"] = None
        return tokenizer.encode_batch(texts, _worker["threads"])
    return encoded


def init_worker(settings: Settings, max_doc_chars: int, threads: int, word_cache: bool = True) -> None:
    """Load the tokenizer and the normaliser of this process. `threads`: the tokenizer's (-1: all)."""
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


def init_pool_worker(settings: Settings, max_doc_chars: int, threads: int, word_cache: bool = True) -> None:
    """`init_worker` in a pool process that ends with the main process: on Linux it asks for
    SIGKILL when its parent exits, so a killed `megalong preprocess` leaves no workers behind
    (they would wait forever to hand back their blocks)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    init_worker(settings, max_doc_chars, threads, word_cache)


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


def encode_block(job: tuple[bytes, int, str]) -> dict:
    """Parse and tokenize one block of lines (bytes, its first line's number, the file). Returns
    {"groups": {subset: (concatenated tokens, lengths)} in input order, "problems": [(kind,
    message)] of the lines skipped, "filtered": documents of other subsets}."""
    block, first_line, where = job
    from megalong.data.long_documents import encode_long

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
