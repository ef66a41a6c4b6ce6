"""The tokenizer objects megalong and megatron-core's GPTDataset use: a SentencePiece `.model`
(`SentencePieceTokenizer`, what `megalong tokenizer train` writes) or a Hugging Face
`tokenizer.json` (`HFTokenizer`); `load_tokenizer` picks by the file name.

megalong's SentencePiece models are trained (megalong/data/tokenizer_training.py) so that
decode(encode(text)) == text. Ids: 0 <unk>, 1 <s>, 2 </s> (end of document), no pad.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from megalong.config import ConfigError
from megalong.errors import TokenizerError

_WORDS = re.compile(r" *[^ ]+| +")




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
