"""SentencePiece tokenizer: training on a sample of a corpus, and the tokenizer object that
megalong and megatron-core's GPTDataset use.

Trained so that decode(encode(text)) == text: identity normalisation, no collapsing of
whitespace, byte fallback for characters outside the vocabulary, and "\\n" as a piece of its own
(SentencePiece trains on single lines, so it would otherwise never see a newline and map it to
bytes or, without byte fallback, to <unk>). Ids: 0 <unk>, 1 <s>, 2 </s> (end of document), no pad.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, ReadStats, expand_inputs, iter_documents

log = logging.getLogger("megalong")

MODEL_TYPES = ("bpe", "unigram")


def sample_documents(inputs: Iterable[str] | str, sample_docs: int, json_key: str = "text",
                     max_doc_chars: int = 20_000, seed: int = 0,
                     skip_bad_lines: bool = False) -> tuple[list[str], ReadStats]:
    """A uniform sample (reservoir) of up to `sample_docs` documents over all input files, each
    cut to `max_doc_chars` characters: memory stays under sample_docs x max_doc_chars."""
    if sample_docs < 1:
        raise ConfigError(f"sample_docs (--sample-docs): expected a positive number, got {sample_docs}")
    rng = random.Random(seed)
    stats = ReadStats()
    reservoir: list[str] = []
    for seen, text in enumerate(iter_documents(inputs, json_key, skip_bad_lines, stats)):
        text = str(text[:max_doc_chars])
        if len(reservoir) < sample_docs:
            reservoir.append(text)
        else:
            j = rng.randint(0, seen)
            if j < sample_docs:
                reservoir[j] = text
    return reservoir, stats


def trainer_settings(vocab_size: int, model_type: str, max_sentence_bytes: int) -> dict:
    """The SentencePiece trainer options megalong uses (recorded in <prefix>.settings.json)."""
    return {
        "vocab_size": vocab_size, "model_type": model_type,
        "byte_fallback": True, "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False, "add_dummy_prefix": True,
        "split_digits": True, "allow_whitespace_only_pieces": True,
        "user_defined_symbols": ["\n"],
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "character_coverage": 0.9995, "hard_vocab_limit": False,
        "max_sentence_length": max_sentence_bytes, "input_sentence_size": 5_000_000,
        "shuffle_input_sentence": True, "num_threads": min(16, os.cpu_count() or 1),
    }


def _train(sample_file: Path, prefix: Path, settings: dict) -> None:
    spm.SentencePieceTrainer.train(input=str(sample_file), model_prefix=str(prefix), minloglevel=2,
                                   **settings)


def _coverage_of_top_chars(sample_file: Path, keep: int) -> float:
    """The character_coverage at which SentencePiece keeps the `keep` most frequent characters."""
    counts: collections.Counter = collections.Counter()
    with open(sample_file, encoding="utf-8") as f:
        for line in f:
            counts.update(line.rstrip("\n"))
    total = sum(counts.values())
    kept = sum(n for _, n in counts.most_common(keep))
    return kept / total


def train_sentencepiece(inputs: Iterable[str] | str, model_prefix: str | Path, vocab_size: int,
                        model_type: str = "bpe", sample_docs: int = 50_000, json_key: str = "text",
                        max_doc_chars: int = 20_000, seed: int = 0,
                        skip_bad_lines: bool = False) -> Path:
    """Train a SentencePiece model on a sample of the corpus; returns `<model_prefix>.model` and
    writes `<model_prefix>.vocab` and `<model_prefix>.settings.json` beside it."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type (--model-type): expected one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 260:
        raise ConfigError(f"vocab_size (--vocab-size): {vocab_size} is too small; byte fallback alone "
                          f"needs 256 pieces plus the special ones (at least 260)")
    files = expand_inputs(inputs)
    started = time.perf_counter()
    docs, stats = sample_documents(files, sample_docs, json_key, max_doc_chars, seed, skip_bad_lines)
    if not any(doc.strip() for doc in docs):
        raise CorpusError(f"{', '.join(files)}: no non-empty documents under '{json_key}' to train "
                          f"a tokenizer on")
    if stats.bad_lines:
        log.warning("tokenizer: skipped %d bad lines, e.g. %s", stats.bad_lines, stats.examples[0])
    settings = trainer_settings(vocab_size, model_type, max_sentence_bytes=4 * max_doc_chars + 16)
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megalong-spm-") as tmp:
        # One line per sentence: the newlines inside documents become sentence breaks ("\n" is
        # a user-defined piece, so it needs no statistics).
        sample_file = Path(tmp) / "sample.txt"
        with open(sample_file, "w", encoding="utf-8") as f:
            for doc in docs:
                for line in doc.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        sampled = len(docs)
        check = docs[:200]
        del docs
        try:
            _train(sample_file, prefix, settings)
        except RuntimeError as e:
            if "required_chars" not in str(e):
                raise
            # More distinct characters than a small vocabulary holds: keep the most frequent ones
            # within half the pieces left after bytes and specials; the rest use byte fallback.
            keep = max(1, (vocab_size - 260) // 2)
            settings["character_coverage"] = _coverage_of_top_chars(sample_file, keep)
            log.info("tokenizer: too many distinct characters for %d pieces; character_coverage "
                     "lowered to %.4f", vocab_size, settings["character_coverage"])
            try:
                _train(sample_file, prefix, settings)
            except RuntimeError as e2:
                raise ConfigError(f"vocab_size (--vocab-size): SentencePiece cannot train {vocab_size} "
                                  f"pieces on this sample: {e2}") from None
    model = Path(f"{prefix}.model")
    record = {**settings, "inputs": files, "sampled_documents": sampled, "json_key": json_key,
              "max_doc_chars": max_doc_chars, "seed": seed, "skipped_bad_lines": stats.bad_lines}
    Path(f"{prefix}.settings.json").write_text(json.dumps(record, indent=1))
    tokenizer = SentencePieceTokenizer(model)
    broken = sum(tokenizer.decode(tokenizer.encode(doc)) != doc for doc in check)
    if broken:
        log.warning("tokenizer: %d of %d sampled documents do not decode back to themselves",
                    broken, len(check))
    log.info("tokenizer: %d pieces (%s) from %d sampled documents in %.1f s -> %s", tokenizer.vocab_size,
             model_type, sampled, time.perf_counter() - started, model)
    return model


class SentencePieceTokenizer:
    """A SentencePiece model with what megalong and megatron-core's GPTDataset need of a
    tokenizer: `encode`, `decode`, `vocab_size`, `eod` and `pad`, and `unique_identifiers` (megatron
    hashes it into its dataset-cache names)."""

    def __init__(self, model_path: str | Path):
        model_path = str(model_path)
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._digest = hashlib.sha1(Path(model_path).read_bytes()).hexdigest()[:16]
        if self._sp.eos_id() < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no end-of-sequence piece (eos_id)")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(str(text))

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Many texts at once, on `num_threads` threads (-1: all cores)."""
        return self._sp.encode([str(t) for t in texts], num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """The end-of-document id ("</s>") that preprocess appends to every document."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        # -1 (no pad piece): megatron's GPTDataset masks the loss where labels equal `pad`, and
        # no token ever equals -1.
        return self._sp.pad_id()

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "model": self.model_path, "sha1": self._digest}

    def __getstate__(self) -> dict:  # picklable (DataLoader workers): reload from the file
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, .vocab, .settings.json")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--sample-docs", type=int, default=50_000,
                        help="documents sampled uniformly across all files (default 50000)")
    parser.add_argument("--max-doc-chars", type=int, default=20_000,
                        help="each sampled document is cut to this many characters (bounds memory)")
    parser.add_argument("--json-key", default="text", help="the key holding the document text")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count lines that are not UTF-8/JSON or lack the key, "
                             "instead of stopping")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document sample")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                        args.sample_docs, args.json_key, args.max_doc_chars, args.seed,
                        args.skip_bad_lines)
    return 0
