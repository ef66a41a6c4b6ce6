"""`megalong tokenizer train`: a SentencePiece model trained on a uniform sample of a corpus.

Trained so that decode(encode(text)) == text: identity normalisation, no collapsing of
whitespace, byte fallback for characters outside the vocabulary, and "\\n" as a piece of its own
(SentencePiece trains on single lines, so it would otherwise never see a newline and map it to
bytes or, without byte fallback, to <unk>). Ids: 0 <unk>, 1 <s>, 2 </s> (end of document), no pad.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable

from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, Document, ReadStats, expand_inputs, iter_documents
from megalong.data.tokenizer import SentencePieceTokenizer
from megalong.errors import TokenizerError
from megalong.paths import check_output_prefix, writing

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
    reservoir: list = []
    for seen, doc in enumerate(iter_documents(inputs, json_key, skip_bad_lines, stats)):
        text = Document(doc[:max_doc_chars], doc.path, doc.line_number)
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
    import sentencepiece as spm

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
    prefix = check_output_prefix(model_prefix, "model_prefix (--model-prefix)")
    files = expand_inputs(inputs)
    started = time.perf_counter()
    docs, stats = sample_documents(files, sample_docs, json_key, max_doc_chars, seed, skip_bad_lines)
    if not any(doc.strip() for doc in docs):
        raise CorpusError(f"{', '.join(files)}: no non-empty documents under '{json_key}' to train "
                          f"a tokenizer on")
    if stats.bad_lines:
        log.warning("tokenizer: skipped %d bad lines, e.g. %s", stats.bad_lines, stats.examples[0])
    settings = trainer_settings(vocab_size, model_type, max_sentence_bytes=4 * max_doc_chars + 16)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megalong-spm-") as tmp:
        # One line per sentence: the newlines inside documents become sentence breaks ("\n" is
        # a user-defined piece, so it needs no statistics).
        sample_file = Path(tmp) / "sample.txt"
        with writing(sample_file), open(sample_file, "w", encoding="utf-8") as f:
            for doc in docs:
                for line in doc.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        sampled = len(docs)
        per_file = collections.Counter(doc.path for doc in docs)
        check = [str(doc) for doc in docs[:200]]
        del docs
        try:
            _train(sample_file, prefix, settings)
        except (RuntimeError, OSError) as e:
            if "required_chars" not in str(e):
                raise TokenizerError(f"{prefix}.model: SentencePiece could not train or write the "
                                     f"tokenizer: {e}") from None
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
    record = {**settings, "inputs": files, "sampled_documents": sampled,
              "sampled_per_file": {f: per_file.get(f, 0) for f in files},
              "documents_read": stats.documents, "memory_bound_chars": sample_docs * max_doc_chars,
              "json_key": json_key,
              "max_doc_chars": max_doc_chars, "seed": seed, "skipped_bad_lines": stats.bad_lines}
    with writing(f"{prefix}.settings.json"):
        Path(f"{prefix}.settings.json").write_text(json.dumps(record, indent=1))
    tokenizer = SentencePieceTokenizer(model)
    broken = sum(tokenizer.decode(tokenizer.encode(doc)) != doc for doc in check)
    if broken:
        log.warning("tokenizer: %d of %d sampled documents do not decode back to themselves",
                    broken, len(check))
    log.info("tokenizer: %d pieces (%s) from %d sampled documents in %.1f s -> %s", tokenizer.vocab_size,
             model_type, sampled, time.perf_counter() - started, model)
    return model
