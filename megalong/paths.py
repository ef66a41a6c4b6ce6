"""Output paths checked before any work starts: a directory (or the folder of a file prefix)
that is under a file, is a file, or cannot be written is an OutputError naming the config key or
option, instead of a traceback after minutes of work. Nothing is created by the checks."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from megalong.errors import DISK_ERRNOS, OutputError


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor; an existing non-directory on the way
    (a path under a file) is an error for the caller to name."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable_dir(path: str | os.PathLike, key: str) -> Path:
    """`path` is a directory this process can create files in, or a directory that can be
    created (its nearest existing ancestor is a writable directory). Returns the absolute path."""
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{key}: {path} is a file, not a directory")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise OutputError(f"{key}: {path} is under {existing}, which is a file, not a directory")
    try:  # os.access is not enough: root passes it on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".megalong-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == target else f" (its nearest existing folder {existing})"
        raise OutputError(f"{key}: cannot write in {path}{where}: {e.strerror or e}") from None
    return target


def check_output_prefix(prefix: str | os.PathLike, key: str) -> Path:
    """A file prefix (PREFIX.bin, PREFIX.model, ...): not a directory itself, in a writable folder."""
    text = os.fspath(prefix)
    if not text or text.endswith(os.sep) or Path(text).is_dir():
        raise OutputError(f"{key}: {text or repr(text)} is a directory, not a file prefix "
                          f"(e.g. {os.path.join(text or '.', 'name')})")
    target = Path(os.path.abspath(text))
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputError(f"{key}: {text} is under {existing}, which is a file, not a directory")
    check_writable_dir(target.parent, key)
    return target


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write (disk full, quota, read-only file system) into an OutputError naming
    `path`: a write to an open file raises an OSError without a file name."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
