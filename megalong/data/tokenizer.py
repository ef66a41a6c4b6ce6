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
import itertools
import json
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from megalong.argtypes import int_at_least, positive_int
from megalong.config import ConfigError
from megalong.data.corpus import CorpusError, Document, ReadStats, expand_inputs, iter_documents
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


class SentencePieceTokenizer:
    """A SentencePiece model with what megalong and megatron-core's GPTDataset need of a
    tokenizer: `encode`, `decode`, `vocab_size`, `eod` and `pad`, and `unique_identifiers` (megatron
    hashes it into its dataset-cache names)."""

    def __init__(self, model_path: str | Path):
        model_path = str(model_path)
        data = _read_tokenizer_file(model_path)
        if data.lstrip()[:1] == b"{":
            raise TokenizerError(f"{model_path}: a JSON file (a Hugging Face tokenizer.json?), not a "
                                 f"SentencePiece .model")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            reason = re.sub(r"^INTERNAL: |src/\S+ ", "", _first_line(e))
            if "ParseFromArray" in reason:
                reason = "it cannot be parsed: truncated or another kind of file"
            raise TokenizerError(f"{model_path}: not a SentencePiece .model ({reason})") from None
        self._digest = hashlib.sha1(data).hexdigest()[:16]
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{model_path}: the SentencePiece model has no end-of-sequence piece (eos_id)")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(str(text))

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Many texts at once, on `num_threads` threads (-1: all cores)."""
        return self._sp.encode([str(t) for t in texts], num_threads=num_threads)

    @property
    def word_local(self) -> bool:
        """Whether encoding is a concatenation of the encodings of space-separated words, so that
        `encode_batch_words` may cache them: a BPE model (its merges never cross the "▁" that
        starts a word) whose normaliser changes nothing but spaces and adds the dummy prefix."""
        from megalong.export.tokenizer import sentencepiece_model_type

        probe = "  a  \ufb01 \uff21 e\u0301 \t\u00a0x\n y  "
        return (sentencepiece_model_type(self.model_path) == "bpe"
                and self._sp.normalize(probe) == "\u2581" + probe.replace(" ", "\u2581")
                and self.encode("\n")[-1] == self._sp.piece_to_id("\n"))

    def encode_batch_words(self, texts: list[str], cache: dict, max_cache: int = 1 << 20) -> list[list[int]]:
        """The same tokens as `encode_batch`, for a `word_local` model, much faster: each text is
        cut into words (spaces, then non-spaces); the first word is encoded as it is, every
        other word after a "\n" (so it gets no dummy prefix; the tokens of that "\n" are
        dropped) and remembered in `cache` (cleared when it holds `max_cache` words)."""
        lead = cache.get(None)
        if lead is None:
            lead = cache[None] = self.encode("\n")
        n = len(lead)
        split = _WORDS.findall
        words = [split(t) for t in texts]
        missing = {w: None for ws in words for w in ws[1:] if w not in cache}
        if missing:
            if len(cache) + len(missing) > max_cache:
                cache.clear()
                cache[None] = lead
            keys = list(missing)
            for key, ids in zip(keys, self._sp.encode(["\n" + k for k in keys], num_threads=1)):
                if ids[:n] != lead:
                    raise ValueError(f"word {key!r}: its tokens after a newline do not start with {lead}")
                cache[key] = ids[n:]
        firsts = self._sp.encode([ws[0] if ws else "" for ws in words], num_threads=1)
        get = cache.__getitem__
        return [list(itertools.chain(first, *map(get, ws[1:]))) for first, ws in zip(firsts, words)]

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


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json with the interface of SentencePieceTokenizer.
    Special tokens are never added around documents; `eod` is the first of EOD_CANDIDATES in the
    vocabulary, or the token named by `eod_token`."""

    EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

    def __init__(self, path: str | Path, eod_token: str | None = None):
        from tokenizers import Tokenizer

        path = str(path)
        data = _read_tokenizer_file(path)
        self.model_path = path
        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json (not UTF-8 text; a "
                                 f"SentencePiece .model?)") from None
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({_first_line(e)})") from None
        self._digest = hashlib.sha1(data).hexdigest()[:16]
        names = [eod_token] if eod_token else list(self.EOD_CANDIDATES)
        ids = [self._tok.token_to_id(n) for n in names]
        self._eod = next((i for i in ids if i is not None), None)
        if eod_token and self._eod is None:
            raise ConfigError(f"eod_token (--eod-token): {eod_token!r} is not in the vocabulary of {path}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(str(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast([str(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ConfigError(f"eod_token (--eod-token): {self.model_path} has none of the tokens "
                              f"{self.EOD_CANDIDATES}; name one with --eod-token or use --no-append-eod")
        return self._eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "model": self.model_path, "sha1": self._digest}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_tokenizer_file(path: str) -> bytes:
    """The bytes of a tokenizer file; missing, a directory or unreadable is a TokenizerError."""
    p = Path(path)
    if p.is_dir():
        raise TokenizerError(f"{path}: is a directory, not a tokenizer file")
    if not p.is_file():
        raise TokenizerError(f"{path}: file not found")
    try:
        return p.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None


def load_tokenizer(path: str | Path, eod_token: str | None = None):
    """A `tokenizer.json` (Hugging Face tokenizers) or a SentencePiece `.model`."""
    if str(path).endswith(".json"):
        return HFTokenizer(path, eod_token)
    if eod_token:
        raise ConfigError("eod_token (--eod-token): only for tokenizer.json; SentencePiece uses its eos piece")
    return SentencePieceTokenizer(path)


def _split_points(text: str, max_chars: int) -> list[int]:
    """Cut positions at most ~max_chars apart, each just before a newline that follows a
    non-whitespace character (there both SentencePiece and byte-level BPE start a new piece)."""
    points, start, n = [], 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + 1, end)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind("\n", start + 1, cut)
        if cut <= start:  # no cut in the window: take the next one after it
            cut = end
            while (cut := text.find("\n", cut + 1)) > 0 and text[cut - 1].isspace():
                pass
            if cut < 0:
                break
        points.append(cut)
        start = cut
    return points


def encode_long(tokenizer, text: str, max_chars: int, dtype, encode=None) -> np.ndarray:
    """The tokens of one long document, encoded piece by piece (at most about `max_chars`
    characters at a time, cut before line breaks) so that memory stays bounded. A piece after a
    cut starts with "\n"; the tokens the tokenizer puts before that newline on its own (the
    dummy-prefix "▁" of SentencePiece) are dropped, which makes the result equal to encoding
    the whole text; if they are not what is expected the whole text is encoded at once.
    `encode` (default tokenizer.encode) must give the tokenizer's tokens."""
    encode = encode or tokenizer.encode
    points = _split_points(text, max_chars)
    if not points:
        return np.asarray(encode(text), dtype=dtype)
    lead = tokenizer.encode("\n")[:-1]
    pieces = [np.asarray(encode(text[:points[0]]), dtype=dtype)]
    for begin, end in zip(points, points[1:] + [len(text)]):
        ids = encode(text[begin:end])
        if ids[:len(lead)] != lead:
            log.warning("a long document could not be encoded in pieces; encoding it whole")
            return np.asarray(encode(text), dtype=dtype)
        pieces.append(np.asarray(ids[len(lead):], dtype=dtype))
        del ids
    return np.concatenate(pieces)


_WORDS = re.compile(r" *[^ ]+| +")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, .vocab, .settings.json")
    parser.add_argument("--vocab-size", type=int_at_least(260), required=True,
                        help="pieces (at least 260: byte fallback needs 256 plus the special ones)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--sample-docs", type=positive_int, default=50_000,
                        help="documents sampled uniformly across all files (default 50000)")
    parser.add_argument("--max-doc-chars", type=positive_int, default=20_000,
                        help="each sampled document is cut to this many characters (bounds memory)")
    parser.add_argument("--json-key", default="text", help="the key holding the document text")
    parser.add_argument("--on-bad-input", choices=("stop", "skip"), default=None,
                        help="a line that is not UTF-8/JSON/Unicode or lacks the key: stop with the "
                             "file and line (default) or skip and count it")
    parser.add_argument("--skip-bad-lines", action="store_true", help="the same as --on-bad-input skip")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the document sample")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    skip = args.on_bad_input == "skip" or (args.on_bad_input is None and args.skip_bad_lines)
    train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                        args.sample_docs, args.json_key, args.max_doc_chars, args.seed, skip)
    return 0
