"""megatron-core's IndexedDataset files (PREFIX.bin + PREFIX.idx), written and merged in bounded memory.

The format is megatron-core's (`indexed_dataset.py`, version 1), one sequence per document:
    .idx: b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code, <Q sequences, <Q documents + 1,
          int32 lengths[sequences], int64 byte pointers[sequences], int64 document_indices[documents + 1]
    .bin: the tokens of every sequence, back to back, in the dtype of the .idx.
`ShardWriter` appends whole chunks of documents (one write per chunk, 4 bytes of memory per
document), so it is the fast path of `megalong preprocess`; megatron-core's reader reads the result.
`check_dataset` verifies a pair before megatron-core memory-maps it (which would fail with an
assertion, a numpy error or a silent out-of-range read): the header's magic, version and dtype
code, the .idx length against its counts, and the .bin length against the token count.
"""
from __future__ import annotations

import glob
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megalong.config import ConfigError
from megalong.errors import DatasetError
from megalong.paths import check_output_prefix, writing

HEADER = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(HEADER) + 8 + 1 + 8 + 8
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: np.dtype(t) for t, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (megatron's own threshold), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


class ShardWriter:
    """Writes PATH.bin as chunks arrive and PATH.idx on `finish`; nothing is renamed here."""

    def __init__(self, path: str | Path, dtype: type):
        self.path = str(path)
        self.dtype = np.dtype(dtype)
        with writing(f"{self.path}.bin"):
            self._bin = open(f"{self.path}.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated tokens and their lengths."""
        if len(lengths) == 0:
            return
        with writing(f"{self.path}.bin"):
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(len(tokens))

    def finish(self) -> None:
        with writing(f"{self.path}.bin"):
            self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        self._lengths = []
        write_index(f"{self.path}.idx", self.dtype, lengths)

    def abort(self) -> None:
        self._bin.close()


def write_index(path: str, dtype: np.dtype, lengths: np.ndarray) -> None:
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with writing(path), open(path, "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def read_header(idx_path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) of an .idx file; DatasetError naming what is wrong."""
    try:
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise DatasetError(f"{idx_path}: cannot read: {e.strerror or e}") from None
    if head[:len(HEADER)] != HEADER:
        raise DatasetError(f"{idx_path}: not a megatron .idx file (its first bytes are not the "
                           f"magic {HEADER!r})")
    if len(head) < HEADER_BYTES:
        raise DatasetError(f"{idx_path}: truncated: {len(head)} bytes, shorter than the "
                           f"{HEADER_BYTES}-byte header")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(HEADER):HEADER_BYTES])
    if version != 1:
        raise DatasetError(f"{idx_path}: .idx version {version}; megatron-core's format is version 1")
    if code not in CODE_DTYPES:
        raise DatasetError(f"{idx_path}: unknown dtype code {code} (known: "
                           f"{', '.join(f'{c} {d.name}' for c, d in CODE_DTYPES.items())})")
    if documents < 1:
        raise DatasetError(f"{idx_path}: the header counts {documents} document indices; at least 1 "
                           f"(the leading 0) is needed")
    return CODE_DTYPES[code], sequences, documents - 1


def check_dataset(prefix: str, key: str = "") -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) of PREFIX.bin/.idx after checking that both files exist and
    agree with each other: DatasetError naming the file (and `key`, the config key or option that
    gave the prefix) and what is wrong. Reads the header and the index arrays (memory-mapped)."""
    where = f"{key}: " if key else ""
    for suffix in (".bin", ".idx"):
        path = Path(prefix + suffix)
        if path.is_dir():
            raise DatasetError(f"{where}{path} is a directory, not a dataset file")
        if not path.is_file():
            raise DatasetError(f"{where}{path}: file not found (a .bin/.idx prefix; make one with "
                               f"`megalong preprocess`)")
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    try:
        dtype, sequences, documents = read_header(idx)
    except DatasetError as e:
        raise DatasetError(f"{where}{e}") from None
    expected = HEADER_BYTES + 4 * sequences + 8 * sequences + 8 * (documents + 1)
    actual = os.path.getsize(idx)
    if actual != expected:
        raise DatasetError(f"{where}{idx}: {actual} bytes, but its header ({sequences} sequences, "
                           f"{documents} documents) needs {expected}: "
                           f"{'truncated' if actual < expected else 'extra bytes at the end'}")
    _, lengths, doc_idx = read_index(idx)
    bin_bytes = os.path.getsize(bin_)
    if sequences:
        if int(lengths.min()) < 0:
            raise DatasetError(f"{where}{idx}: negative sequence lengths")
        pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * sequences,
                             shape=(sequences,))
        tokens = int(np.asarray(lengths, dtype=np.int64).sum())
        end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
        if int(pointers[0]) != 0 or end != tokens * dtype.itemsize:
            raise DatasetError(f"{where}{idx}: its byte pointers do not match its sequence lengths")
        del pointers
    else:
        tokens = 0
    if bin_bytes != tokens * dtype.itemsize:
        raise DatasetError(f"{where}{bin_}: {bin_bytes} bytes, but {idx} counts {tokens} tokens of "
                           f"{dtype.name} = {tokens * dtype.itemsize} bytes: "
                           f"{'truncated' if bin_bytes < tokens * dtype.itemsize else 'extra bytes'} "
                           f"(or the two files are from different runs)")
    if int(doc_idx[0]) != 0 or int(doc_idx[-1]) != sequences:
        raise DatasetError(f"{where}{idx}: its document indices do not span its {sequences} sequences")
    del lengths, doc_idx
    return dtype, sequences, documents


def read_index(idx_path: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths int32, document indices int64), memory-mapped."""
    dtype, n, docs = read_header(idx_path)
    offset = 34
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0, np.int32)
    offset += 4 * n + 8 * n
    doc_idx = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offset, shape=(docs + 1,))
    return dtype, lengths, doc_idx


def expand_prefixes(patterns: Iterable[str]) -> list[str]:
    """Prefixes and globs of prefixes (matched against PREFIX.idx); each must have .bin and .idx."""
    prefixes: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        if glob.has_magic(pattern):
            found = sorted(p[:-4] for p in glob.glob(pattern + ".idx"))
            if not found:
                raise ConfigError(f"{pattern}: no .bin/.idx prefix matches this pattern")
        else:
            found = [pattern[:-4] if pattern.endswith((".bin", ".idx")) else pattern]
        for prefix in found:
            check_dataset(prefix)
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def merge(prefixes: Sequence[str], output_prefix: str | Path) -> tuple[int, int]:
    """Concatenate datasets (same dtype, in order) into OUTPUT_PREFIX.bin/.idx, written under
    temporary names and renamed when complete; returns (documents, tokens)."""
    prefixes = expand_prefixes(prefixes)
    out = Path(output_prefix)
    if any(os.path.abspath(p) == os.path.abspath(out) for p in prefixes):
        raise ConfigError(f"--output-prefix: {out} is also an input")
    check_output_prefix(out, "--output-prefix")
    dtypes = {p: read_header(p + ".idx")[0] for p in prefixes}
    if len(set(dtypes.values())) > 1:
        raise ConfigError("merge: the inputs have different token dtypes: "
                          + ", ".join(f"{p} {d}" for p, d in dtypes.items()))
    dtype = next(iter(dtypes.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.merge.tmp")
    lengths = []
    try:
        with writing(f"{tmp}.bin"), open(f"{tmp}.bin", "wb") as bin_out:
            for prefix in prefixes:
                _, seq_lengths, doc_idx = read_index(prefix + ".idx")
                if not np.array_equal(doc_idx, np.arange(len(seq_lengths) + 1)):
                    raise ConfigError(f"{prefix}.idx: documents of several sequences cannot be merged")
                expected = int(np.asarray(seq_lengths, dtype=np.int64).sum()) * dtype.itemsize
                if os.path.getsize(prefix + ".bin") != expected:
                    raise ConfigError(f"{prefix}.bin: {os.path.getsize(prefix + '.bin')} bytes, its .idx "
                                      f"says {expected}")
                with open(prefix + ".bin", "rb") as f:
                    shutil.copyfileobj(f, bin_out, 1 << 24)
                lengths.append(np.array(seq_lengths))
                del seq_lengths, doc_idx
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        write_index(f"{tmp}.idx", dtype, all_lengths)
    except BaseException:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    os.replace(f"{tmp}.bin", f"{out}.bin")
    os.replace(f"{tmp}.idx", f"{out}.idx")
    return len(all_lengths), int(all_lengths.astype(np.int64).sum())
