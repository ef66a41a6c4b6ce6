"""Errors a user can fix: each is printed by the CLI as one line, `megalong: <kind> error: <message>`,
where the message names the config key, option, file or line it is about.

Torch-free, so that the config and the launchers' pre-flight check (megalong/preflight.py) can
raise and print them without importing megatron-core.
"""
from __future__ import annotations

import errno
import re
from typing import Optional


class MegalongError(ValueError):
    """Base of megalong's user-facing errors; `kind` names the class in the printed line."""

    kind = "megalong"


class TokenizerError(MegalongError):
    """A tokenizer file that is missing or cannot be parsed (names the file)."""

    kind = "tokenizer"


class DatasetError(MegalongError):
    """A .bin/.idx dataset whose files are missing, damaged or inconsistent (names the file)."""

    kind = "dataset"


class CheckpointError(MegalongError):
    """A checkpoint that is missing, incomplete, corrupt, or from another configuration, or a
    save_dir a run must not write into (names the file or directory)."""

    kind = "checkpoint"


class OutputError(MegalongError):
    """An output path that cannot be written: under a file, not writable, disk full."""

    kind = "output"


class TrainingError(MegalongError):
    """A run that cannot go on (a non-finite loss); the message says where its last good
    checkpoint is."""

    kind = "train"


class UsageError(MegalongError):
    """A command-line argument that is missing, unknown or out of range (names the option)."""

    kind = "usage"


# Errors of the disk or file system a user can act on; reported without a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
               errno.EISDIR, errno.EFBIG}


def one_line(text: str) -> str:
    """A message on one line (YAML and library messages carry line breaks)."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def format_error(kind: str, message: object) -> str:
    return f"megalong: {kind} error: {one_line(str(message))}"


def describe_os_error(e: OSError) -> Optional[str]:
    """The message of a disk or permission error (None for other OS errors)."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"
