"""The SentencePiece tokenizer as a Hugging Face fast tokenizer (tokenizer.json), loadable with
`AutoTokenizer` without custom code and without protobuf.

BPE pieces and their merge order, or unigram pieces and their scores, are read from the
SentencePiece model itself; the pre-tokenizer and decoder reproduce SentencePiece's whitespace
handling (spaces become "▁", one "▁" is prepended to the text, byte-fallback pieces decode to bytes).

SentencePiece never reads its control pieces ("<s>", "</s>", "<unk>") from text: a literal "</s>"
in a document is ordinary characters. tokenizer_config.json sets `split_special_tokens` so that
transformers does the same (the flag lives in the config: tokenizer.json cannot store it).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"
log = logging.getLogger("megalong")


def _vocab_and_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    atomic = set(_user_defined_ids(sp))
    merges = []
    for piece, merged_id in vocab.items():
        if sp.is_control(merged_id) or sp.is_unknown(merged_id) or sp.is_byte(merged_id) or merged_id in atomic:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((merged_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _protobuf_fields(buf: bytes):
    """(field number, value) of a protobuf message: just enough to read a SentencePiece model
    without depending on the protobuf package."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def sentencepiece_model_type(model_path: str | Path) -> str:
    """"bpe" or "unigram": ModelProto.trainer_spec (field 2) . model_type (field 3)."""
    for number, trainer_spec in _protobuf_fields(Path(model_path).read_bytes()):
        if number == 2:
            types = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
            kind = dict(_protobuf_fields(trainer_spec)).get(3, 1)  # protobuf default: UNIGRAM
            return types.get(kind, f"type {kind}")
    return "unigram"


def _user_defined_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    """SentencePiece stores user-defined symbols (megalong's "\\n") after the control pieces and
    before the byte pieces; its Python API has no predicate for them."""
    first_byte = next((i for i in range(sp.get_piece_size()) if sp.is_byte(i)), None)
    if first_byte is None:
        raise ValueError("the SentencePiece model has no byte-fallback pieces; megalong tokenizers "
                         "are trained with byte_fallback=True")
    return [i for i in range(first_byte) if not (sp.is_control(i) or sp.is_unknown(i))]


def hf_tokenizer_from_sentencepiece(model_path: str | Path) -> Tokenizer:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    kind = sentencepiece_model_type(model_path)
    if kind == "bpe":
        vocab, merges = _vocab_and_merges(sp)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()),
                           byte_fallback=True, fuse_unk=True)
    elif kind == "unigram":
        # Where two segmentations score exactly the same (runs of spaces), SentencePiece and
        # `tokenizers` may pick different ones: same text, same score, different ids.
        log.warning("unigram tokenizer export: ids can differ from SentencePiece's where two "
                    "segmentations have equal score; text round-trips exactly")
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        model = models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=True)
    else:
        raise ValueError(f"{model_path}: SentencePiece {kind} models cannot be exported (bpe or unigram)")
    tokenizer = Tokenizer(model)
    # SentencePiece: one "▁" before the text (even before a space or newline), every space a "▁",
    # and BPE applied to each whitespace run together with the word that follows it.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    special = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    # User-defined pieces ("\n") stay ordinary vocabulary entries: no merge contains them, so
    # BPE keeps them whole, and the "▁" prepended to the text still comes first, as in SentencePiece.
    return tokenizer


def export_tokenizer(model_path: str | Path, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the .model file."""
    out_dir = Path(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf_tokenizer_from_sentencepiece(model_path).save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    eos = sp.id_to_piece(sp.eos_id())
    specials = {"unk_token": sp.id_to_piece(sp.unk_id()), "eos_token": eos}
    if sp.bos_id() >= 0:
        specials["bos_token"] = sp.id_to_piece(sp.bos_id())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True,
              **specials, "pad_token": eos}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": eos}, indent=1))
