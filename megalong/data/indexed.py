"""megatron-core's IndexedDataset files (PREFIX.bin + PREFIX.idx), written and merged in bounded memory.

The format is megatron-core's (`indexed_dataset.py`, version 1), one sequence per document:
    .idx: b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code, <Q sequences, <Q documents + 1,
          int32 lengths[sequences], int64 byte pointers[sequences], int64 document_indices[documents + 1]
    .bin: the tokens of every sequence, back to back, in the dtype of the .idx.
`ShardWriter` appends whole chunks of documents (one write per chunk, 4 bytes of memory per
document), so it is the fast path of `megalong preprocess`; megatron-core's reader reads the result.
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

HEADER = b"MMIDIDX\x00\x00"
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
        self._bin = open(f"{self.path}.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated tokens and their lengths."""
        if len(lengths) == 0:
            return
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(len(tokens))

    def finish(self) -> None:
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
    with open(path, "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def read_header(idx_path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) of an .idx file."""
    with open(idx_path, "rb") as f:
        head = f.read(len(HEADER) + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[:9] != HEADER:
        raise ConfigError(f"{idx_path}: not a megatron .idx file")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in CODE_DTYPES:
        raise ConfigError(f"{idx_path}: unsupported .idx version {version} or dtype code {code}")
    return CODE_DTYPES[code], sequences, documents - 1


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
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(f"{prefix}{suffix}: file not found")
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
    dtypes = {p: read_header(p + ".idx")[0] for p in prefixes}
    if len(set(dtypes.values())) > 1:
        raise ConfigError("merge: the inputs have different token dtypes: "
                          + ", ".join(f"{p} {d}" for p, d in dtypes.items()))
    dtype = next(iter(dtypes.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.merge.tmp")
    lengths = []
    try:
        with open(f"{tmp}.bin", "wb") as bin_out:
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
