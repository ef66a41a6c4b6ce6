"""megatron-core's dataset index cache (`data.cache_dir`, default `<save_dir>/data_cache`), checked
before megatron-core reads it.

megatron-core saves the document, sample and shuffle indices of every GPTDataset and BlendedDataset
as `.npy` files there and loads them back with `numpy.load(allow_pickle=True)`. numpy unpickles a
file that is not a `.npy` array (a plain pickle under a `.npy` name), and the pickle can run code:
a cache copied from someone else, or downloaded beside a checkpoint, must not be able to. So every
`.npy` file megatron-core may read is opened here first and refused, as a DatasetError naming it,
unless it is what megatron-core writes: numpy's magic, a version 1.0 or 2.0 header (parsed by
numpy's header readers, which evaluate only literals), a dtype without Python objects, and as many
bytes as the header promises (a run killed while writing the cache leaves a short file).

Torch-free: megalong/preflight.py runs the same check before a launcher starts any process.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from megalong.config import Config
from megalong.errors import DatasetError

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def index_cache_root(cfg: Config) -> Path:
    """The directory under which a run's dataset index cache lives (one subdirectory per set of
    .idx files, megalong/data/datasets.py)."""
    return Path(cfg.data.cache_dir or Path(cfg.train.save_dir or ".megalong_cache") / "data_cache")


def check_index_cache(directory: str | os.PathLike, recursive: bool = False) -> int:
    """Check every `.npy` file in `directory` (and its subdirectories if `recursive`); returns how
    many there were. A directory that does not exist holds nothing to check."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    files = sorted(directory.rglob("*.npy") if recursive else directory.glob("*.npy"))
    for path in files:
        check_npy_file(path)
    return len(files)


def check_npy_file(path: Path) -> None:
    """`path` is a plain numeric .npy array, whole (DatasetError otherwise)."""
    advice = "delete it (megalong rebuilds the dataset index cache) if it is not megatron-core's own"
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError as e:
                raise DatasetError(f"{path}: not a .npy array file ({e}); numpy would load it as a "
                                   f"pickle, which can run code: refused; {advice}") from None
            reader = _HEADER_READERS.get(version)
            if reader is None:
                raise DatasetError(f"{path}: .npy format version {version[0]}.{version[1]}; megatron-core "
                                   f"writes 1.0 or 2.0: refused; {advice}")
            try:
                shape, _, dtype = reader(f)
            except ValueError as e:
                raise DatasetError(f"{path}: not a readable .npy header ({e}); {advice}") from None
            data_start = f.tell()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    if dtype.hasobject:
        raise DatasetError(f"{path}: holds Python objects (dtype {dtype}), which numpy would unpickle "
                           f"and could run code; megatron-core's index cache holds only integers: "
                           f"refused; {advice}")
    needed = data_start + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < needed:
        raise DatasetError(f"{path}: {size:,} bytes, but its header ({dtype} {tuple(shape)}) needs "
                           f"{needed:,}: truncated; {advice}")
