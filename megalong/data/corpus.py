"""Pile-format corpora: `.jsonl` and `.jsonl.zst` files and globs, read as streams.

Each non-blank line is one JSON record whose `json_key` (default "text") holds a document. A line
that is not valid UTF-8, not JSON, lacks the key, or whose text holds a lone surrogate (`"\\ud800"`:
valid JSON, but not Unicode text, which no tokenizer can encode) is a `CorpusError` naming the
file and the 1-based line number, unless the caller asked to skip bad lines (then it is counted). Blank lines
are ignored. Files are never read whole: `.zst` is decompressed chunk by chunk.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import zstandard

from megalong.errors import MegalongError


class CorpusError(MegalongError):
    """A corpus file that is missing or a line that cannot be read; names the file and line."""

    kind = "corpus"


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str, raw: bytes) -> str | None:
    """Where `text` (decoded from the JSON line `raw`) holds a lone surrogate, which only a
    `\\uXXXX` escape can produce; None when it holds none."""
    if b"\\u" not in raw:
        return None
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return f"a lone surrogate \\u{ord(found.group()):04x} at character {found.start()} (valid JSON, not Unicode text)"


class Document(str):
    """A document's text (a `str`) that also knows where it came from."""

    path: str
    line_number: int  # 1-based

    def __new__(cls, text: str, path: str, line_number: int) -> "Document":
        doc = super().__new__(cls, text)
        doc.path, doc.line_number = path, line_number
        return doc

    def __getnewargs__(self) -> tuple[str, str, int]:  # for pickle and copy
        return str(self), self.path, self.line_number


@dataclass
class RawLine:
    path: str
    line_number: int  # 1-based
    data: bytes


@dataclass
class ReadStats:
    documents: int = 0
    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)  # the first few bad-line messages

    def count_bad(self, message: str, keep: int = 5) -> None:
        self.bad_lines += 1
        if len(self.examples) < keep:
            self.examples.append(message)


def expand_inputs(inputs: Iterable[str] | str, missing: Optional[list[str]] = None) -> list[str]:
    """Paths and globs -> de-duplicated files (globs sorted); a name that matches nothing is an
    error, or, when a `missing` list is given, appended to it."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[str] = []
    for pattern in map(str, inputs):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            if missing is None:
                raise CorpusError(f"{pattern}: no file matches this pattern")
            missing.append(pattern)
        for path in matches:
            if os.path.isdir(path) and missing is None:
                raise CorpusError(f"{path}: is a directory; give its files or a glob such as "
                                  f"'{os.path.join(path, '*.jsonl.zst')}'")
            if not os.path.isfile(path):
                if missing is None:
                    raise CorpusError(f"{path}: file not found")
                missing.append(path)
            elif path not in files:
                files.append(path)
    if not files and missing is None:
        raise CorpusError("no input files given")
    return files


def _zstd_chunks(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """(decompressed bytes, compressed bytes read so far) of a (possibly multi-frame) .zst file.
    A truncated last frame is an error: zstandard's stream reader would end silently and lose the
    tail of the corpus."""
    with open(path, "rb") as raw:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        pending = b""
        while True:
            data = pending or raw.read(chunk_size)
            pending = b""
            if not data:
                break
            out = dobj.decompress(data)
            if out:
                yield out, raw.tell()
            if dobj.eof:  # one frame done; whatever follows starts the next frame
                pending = dobj.unused_data
                dobj = zstandard.ZstdDecompressor().decompressobj()
                if not pending:
                    pending = raw.read(chunk_size)
                    if not pending:
                        return
        if not dobj.eof:
            raise zstandard.ZstdError("the file ends inside a frame")


def _plain_chunks(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    with open(path, "rb") as raw:
        while data := raw.read(chunk_size):
            yield data, raw.tell()


def file_chunks(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """(bytes, position in the file on disk) pieces of a file, `.zst` decompressed on the fly."""
    return _zstd_chunks(path, chunk_size) if path.endswith(".zst") else _plain_chunks(path, chunk_size)


def iter_blocks(path: str, block_bytes: int = 1 << 20) -> Iterator[tuple[bytes, int, int]]:
    """(block, number of its first line (1-based), position on disk) where each block holds whole
    lines, about `block_bytes` of them; a line longer than that is a block of its own. A zstd
    error (truncated file) propagates as zstandard.ZstdError after the last complete block."""
    pending: list[bytes] = []
    size = 0
    line = 1
    pos = 0
    chunks = file_chunks(path, block_bytes)
    while True:
        try:
            data, pos = next(chunks)
        except StopIteration:
            break
        except zstandard.ZstdError:
            # Keep the whole lines read before the damage; the broken last line is lost.
            block = b"".join(pending)
            block = block[: block.rfind(b"\n") + 1]
            if block:
                yield block, line, pos
            raise
        cut = data.rfind(b"\n")
        if cut < 0:
            pending.append(data)
            size += len(data)
            continue
        pending.append(data[:cut + 1])
        size += cut + 1
        if size >= block_bytes or cut + 1 == len(data):
            block = b"".join(pending)
            yield block, line, pos
            line += block.count(b"\n")
            pending, size = [], 0
        if cut + 1 < len(data):
            pending.append(data[cut + 1:])
            size += len(data) - cut - 1
    if pending:
        block = b"".join(pending)
        if block:
            yield block, line, pos


def _lines_of_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    # Pieces of an unfinished line are joined once, so a very long line costs linear time.
    pending: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            yield b"".join(pending)
            pending.clear()
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def iter_file_lines(path: str) -> Iterator[bytes]:
    """The lines of a file as bytes, decompressing `.zst` on the fly, never the whole file at once."""
    if path.endswith(".zst"):
        yield from _lines_of_chunks(data for data, _ in _zstd_chunks(path))
    else:
        with open(path, "rb") as f:
            yield from f


def iter_raw_lines(paths: Iterable[str]) -> Iterator[RawLine]:
    """Every non-blank line of every file, undecoded, with its position."""
    for path in paths:
        number = 0
        try:
            for number, line in enumerate(iter_file_lines(path), start=1):
                if line.strip():
                    yield RawLine(path, number, line)
        except zstandard.ZstdError as e:
            raise CorpusError(f"{path}: line {number + 1}: truncated or corrupt zstd stream ({e})") from None


def parse_line(line: RawLine, json_key: str) -> str:
    """The document text of one line; CorpusError with file and line if it cannot be had."""
    where = f"{line.path}: line {line.line_number}"
    try:
        text = line.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if line.line_number == 1:
        text = text.lstrip("\ufeff")  # a byte-order mark some editors write
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or json_key not in record:
        raise CorpusError(f"{where}: no '{json_key}' key in this record")
    value = record[json_key]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: '{json_key}' is not a string but {type(value).__name__}")
    problem = lone_surrogate(value, line.data)
    if problem is not None:
        raise CorpusError(f"{where}: '{json_key}' holds {problem}")
    return value


def iter_documents(inputs: Iterable[str] | str, json_key: str = "text", skip_bad_lines: bool = False,
                   stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Documents of the corpus in file order, one at a time, each with `.path` and `.line_number`."""
    stats = stats if stats is not None else ReadStats()
    for line in iter_raw_lines(expand_inputs(inputs)):
        try:
            text = parse_line(line, json_key)
        except CorpusError as e:
            if not skip_bad_lines:
                raise
            stats.count_bad(str(e))
            continue
        stats.documents += 1
        yield Document(text, line.path, line.line_number)


def write_jsonl_zst(path: str | Path, documents: Iterable[str], pile_set_name: str, level: int = 3) -> int:
    """Write documents as Pile-format `.jsonl.zst` lines `{"text", "meta": {"pile_set_name"}}`,
    streamed through a temporary name; returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=level).stream_writer(raw) as out:
            for text in documents:
                record = {"text": str(text), "meta": {"pile_set_name": pile_set_name}}
                out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count
