"""SentencePiece tokenizer: training on a sample of a corpus, and the tokenizer object megalong
and megatron-core's datasets use.

Trained so that decode(encode(text)) == text for any text: identity normalisation, no collapsing
of whitespace, byte fallback for characters outside the vocabulary, and "\n" as a piece of its own
(SentencePiece learns from single lines, so a newline would otherwise never be seen).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm

from megalong.data.corpus import expand_inputs, iter_documents

log = logging.getLogger("megalong")


def sample_documents(inputs: Iterable[str], sample_docs: int, json_key: str = "text",
                     max_doc_chars: int = 20_000, seed: int = 0) -> list[str]:
    """A uniform sample (reservoir) of up to `sample_docs` documents across all input files,
    each cut to `max_doc_chars` characters: memory stays under sample_docs x max_doc_chars."""
    files = expand_inputs(inputs)
    per_doc = max_doc_chars
    rng = random.Random(seed)
    reservoir: list[str] = []
    for seen, text in enumerate(iter_documents(files, json_key, skip_bad_lines=True)):
        text = text[:per_doc]
        if len(reservoir) < sample_docs:
            reservoir.append(text)
        else:
            j = rng.randint(0, seen)
            if j < sample_docs:
                reservoir[j] = text
    return reservoir


def train_sentencepiece(inputs: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", sample_docs: int = 50_000, json_key: str = "text",
                        max_doc_chars: int = 20_000, seed: int = 0) -> Path:
    """Train a SentencePiece model on a sample of the corpus; returns `<model_prefix>.model`."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type: expected bpe or unigram, got {model_type!r}")
    docs = sample_documents(inputs, sample_docs, json_key, max_doc_chars, seed)
    if not docs:
        raise ValueError(f"no documents found in {list(inputs)} to train a tokenizer on")
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    settings = {
        "vocab_size": vocab_size, "model_type": model_type, "byte_fallback": True,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "split_digits": True, "allow_whitespace_only_pieces": True, "user_defined_symbols": ["\n"],
        "pad_id": -1, "unk_id": 0, "bos_id": 1, "eos_id": 2, "max_sentence_length": 1 << 16,
        "character_coverage": 0.9995, "hard_vocab_limit": False, "num_threads": 2, "seed_sentencepiece_size": 1000000,
    }
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix),
                                   minloglevel=2, **settings)
    record = {**settings, "inputs": list(inputs), "sampled_documents": len(docs), "json_key": json_key,
              "seed": seed}
    Path(f"{prefix}.settings.json").write_text(json.dumps(record, indent=1))
    log.info("tokenizer: %d pieces from %d sampled documents -> %s.model", vocab_size, len(docs), prefix)
    return Path(f"{prefix}.model")


class SentencePieceTokenizer:
    """What megalong and megatron-core's GPTDataset need of a tokenizer."""

    def __init__(self, model_path: str | Path):
        model_path = str(model_path)
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        # -1 (no pad piece): megatron's GPTDataset masks the loss where labels equal `pad`.
        return self._sp.pad_id()

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "model": self.model_path}


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, .vocab, .settings.json")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--sample-docs", type=int, default=50_000, help="documents sampled across all files")
    parser.add_argument("--max-doc-chars", type=int, default=20_000,
                        help="each sampled document is cut to this many characters (bounds memory)")
    parser.add_argument("--json-key", default="text")


def run_tokenizer_train(args: argparse.Namespace) -> Optional[int]:
    train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                        args.sample_docs, args.json_key, args.max_doc_chars)
    return 0
