"""A long document tokenized piece by piece (cut before line breaks), so that memory stays a
few times the document's size; the tokens equal those of the whole text."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("megalong")


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
