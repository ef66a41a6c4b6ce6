"""What a `preprocess` run is asked to do (`PreprocessOptions`, checked before any work) and the
part of it that decides the bytes of an output (`Settings`, recorded in every <shard>.done.json)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from megalong.config import ConfigError
from megalong.paths import check_output_prefix

BAD_POLICIES = ("stop", "skip")
EMPTY_POLICIES = ("keep", "skip", "stop")
NORMALIZATIONS = (None, "nfkc", "ftfy")


def _strings(value: Union[str, Path, Iterable[Union[str, Path]]]) -> tuple[str, ...]:
    return (str(value),) if isinstance(value, (str, Path)) else tuple(str(v) for v in value)


@dataclass(frozen=True)
class PreprocessOptions:
    """Every setting of one `preprocess` run (the module docstring of megalong/data/preprocess.py
    tells what they do). `inputs`, `json_keys` and `subsets` accept one string or several."""

    inputs: tuple[str, ...]  # .jsonl/.jsonl.zst files and globs
    output_prefix: str
    tokenizer_model: str  # a SentencePiece .model or a Hugging Face tokenizer.json
    json_keys: tuple[str, ...] = ("text",)
    join_keys: str = "\n\n"  # between the texts of several json_keys
    workers: int = 2
    append_eod: bool = True
    eod_token: Optional[str] = None  # tokenizer.json only
    on_bad: str = "stop"  # BAD_POLICIES
    empty_docs: str = "keep"  # EMPTY_POLICIES
    subsets: Optional[tuple[str, ...]] = None  # keep only these meta.pile_set_name values
    split_by_subset: bool = False
    normalize: Optional[str] = None  # NORMALIZATIONS
    resume: bool = True
    max_doc_chars: int = 1_000_000  # longer documents are tokenized in pieces
    word_cache: bool = True  # SentencePiece BPE: remember words' tokens (same output, faster)
    chunk_bytes: int = 1 << 20  # the size of a block of lines sent to a worker
    log_interval: float = 10.0  # seconds between Progress events

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "inputs", _strings(self.inputs))
        set_(self, "json_keys", _strings(self.json_keys))
        set_(self, "output_prefix", str(self.output_prefix))
        set_(self, "tokenizer_model", str(self.tokenizer_model))
        if self.subsets is not None:
            set_(self, "subsets", tuple(sorted(_strings(self.subsets))))

    def check(self) -> None:
        """A ConfigError (or OutputError) naming the option, before any file is read."""
        if self.workers < 1:
            raise ConfigError(f"workers (--workers): expected at least 1, got {self.workers}")
        if self.on_bad not in BAD_POLICIES:
            raise ConfigError(f"on_bad (--on-bad-input): expected one of {BAD_POLICIES}, got {self.on_bad!r}")
        if self.empty_docs not in EMPTY_POLICIES:
            raise ConfigError(f"empty_docs (--empty-docs): expected one of {EMPTY_POLICIES}, "
                              f"got {self.empty_docs!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize (--normalize): expected nfkc or ftfy, got {self.normalize!r}")
        if self.normalize == "ftfy":
            try:
                import ftfy  # noqa: F401
            except ImportError:
                raise ConfigError("normalize (--normalize): ftfy is not installed (pip install ftfy)") from None
        if not self.json_keys:
            raise ConfigError("json_key (--json-key): at least one key is needed")
        if self.max_doc_chars < 1000:
            raise ConfigError(f"max_doc_chars (--max-doc-chars): expected at least 1000, got {self.max_doc_chars}")
        model = Path(self.tokenizer_model)
        if model.is_dir():
            raise ConfigError(f"tokenizer_model (--tokenizer-model): {model} is a directory, "
                              f"not a tokenizer file (.model or tokenizer.json)")
        if not model.is_file():
            raise ConfigError(f"tokenizer_model (--tokenizer-model): {model} not found")
        check_output_prefix(self.output_prefix, "output_prefix (--output-prefix)")


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
