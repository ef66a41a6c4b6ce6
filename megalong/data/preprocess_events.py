"""What `preprocess` reports: typed events while it runs (handed to the caller's `on_event`; the CLI
logs them with `log_event`) and `PreprocessStats` at the end.

Every event's `message()` is its log line; `level` is the logging level it is logged at (None:
not logged, e.g. `BlockWritten`, which exists for callers that count blocks)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Union

log = logging.getLogger("megalong")


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

    def add_shard(self, shard: "PreprocessStats") -> None:
        """Add the counts of one finished input file (its outputs are added by the caller)."""
        self.bad_lines += shard.bad_lines
        self.empty_documents += shard.empty_documents
        self.filtered += shard.filtered
        self.bad_examples = (self.bad_examples + shard.bad_examples)[:5]
        self.documents += shard.documents
        self.tokens += shard.tokens
        self.bytes += shard.bytes
        self.files_done += 1

    def no_document_lines(self) -> bool:
        """A file that held no document at all, not even a bad, empty or filtered one."""
        return self.documents == self.bad_lines == self.empty_documents == self.filtered == 0

    def rates(self, seconds: Optional[float] = None) -> str:
        return rates(self.documents, self.bytes, self.tokens, self.seconds if seconds is None else seconds)

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


def rates(documents: int, nbytes: int, tokens: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return f"{documents / s:,.0f} docs/s, {nbytes / 1e6 / s:.2f} MB/s, {tokens / s:,.0f} tokens/s"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


@dataclass(frozen=True)
class ShardKept:
    """An input file whose shard is done already with these settings (resume): not read again."""

    level: ClassVar[Optional[int]] = logging.INFO
    path: str
    outputs: tuple[str, ...]

    def message(self) -> str:
        return f"{self.path} is done already ({', '.join(self.outputs)}), kept"


@dataclass(frozen=True)
class InputMissing:
    """An input that does not exist, skipped (on_bad="skip")."""

    level: ClassVar[Optional[int]] = logging.WARNING
    name: str

    def message(self) -> str:
        return f"{self.name}: file not found, skipped"


@dataclass(frozen=True)
class StreamDamaged:
    """A truncated or corrupt .zst, skipped from the damage on (on_bad="skip")."""

    level: ClassVar[Optional[int]] = logging.WARNING
    problem: str

    def message(self) -> str:
        return f"{self.problem} (the documents before it are kept)"


@dataclass(frozen=True)
class EmptyInputSkipped:
    """An input file without any document: no shard (on_bad="skip")."""

    level: ClassVar[Optional[int]] = logging.WARNING
    problem: str

    def message(self) -> str:
        return f"{self.problem}, skipped"


@dataclass(frozen=True)
class BlockWritten:
    """A block of lines tokenized and added to its shard; `blocks`: written so far in this run."""

    level: ClassVar[Optional[int]] = None
    file_index: int
    path: str
    blocks: int

    def message(self) -> str:
        return f"{self.path}: block {self.blocks} written"


@dataclass(frozen=True)
class Progress:
    """Every `log_interval` seconds: the file being read and the whole run, with rates and ETAs."""

    level: ClassVar[Optional[int]] = logging.INFO
    file_index: int
    file_count: int
    path: str
    file_fraction: float
    file_seconds: float
    file_documents: int
    file_bytes: int
    file_tokens: int
    fraction: float  # of the bytes of every file to do
    seconds: float
    documents: int
    bytes: int
    tokens: int

    @staticmethod
    def eta(seconds: float, fraction: float) -> float:
        return seconds * (1 - fraction) / max(fraction, 1e-9)

    def message(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"file {self.file_index + 1}/{self.file_count} {os.path.basename(self.path)} "
                f"{100 * self.file_fraction:.0f}% ("
                f"{rates(self.file_documents, self.file_bytes, self.file_tokens, self.file_seconds)}, "
                f"ETA {format_duration(self.eta(self.file_seconds, self.file_fraction))}) | all "
                f"{100 * self.fraction:.0f}%: {self.documents} docs, {self.documents / s:,.0f} docs/s, "
                f"{self.bytes / 1e6 / s:.2f} MB/s, {self.tokens / s:,.0f} tokens/s, "
                f"ETA {format_duration(self.eta(self.seconds, self.fraction))}")


@dataclass(frozen=True)
class Finished:
    """The run is done: its counts, rates and outputs."""

    level: ClassVar[Optional[int]] = logging.INFO
    stats: PreprocessStats

    def message(self) -> str:
        outputs = self.stats.outputs
        return (f"{self.stats} -> {', '.join(f'{p}.bin/.idx' for p in outputs[:8])}"
                + (f" and {len(outputs) - 8} more" if len(outputs) > 8 else ""))


PreprocessEvent = Union[ShardKept, InputMissing, StreamDamaged, EmptyInputSkipped, BlockWritten, Progress,
                        Finished]
EventHandler = Callable[[PreprocessEvent], None]


def log_event(event: PreprocessEvent) -> None:
    """The CLI's handler: one log line per event that has a level."""
    if event.level is not None:
        log.log(event.level, "preprocess: %s", event.message())
