"""Packed documents in the batch: segment ids, reset positions, the EOD loss mask, the config keys,
and the segment ids reaching the core attention through megatron's GPTModel."""
from __future__ import annotations

import pytest
import torch

from megalong.attention.segments import (
    DocumentSegments,
    document_positions,
    document_starts,
    same_document,
    segment_ids_from_tokens,
    segments_of,
)
from megalong.config import ConfigError, config_from_dict, validate
from megalong.train.documents import DocumentBatching, model_inputs

EOD = 2
# Three documents in row 0 (the first ends at index 2, the second at 3: a one-token document
# after the EOD), and one document without EOD in row 1.
TOKENS = torch.tensor([[5, 6, EOD, EOD, 7, 8, 9, EOD, 4],
                       [5, 6, 7, 8, 9, 10, 11, 12, 13]])


def test_segment_ids_positions_and_starts_from_eod_tokens():
    seg = segment_ids_from_tokens(TOKENS, EOD)
    assert seg.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 3], [0] * 9]
    assert document_positions(seg).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 0], list(range(9))]
    assert document_starts(seg).tolist() == [[True, False, False, True, True, False, False, False, True],
                                             [True] + [False] * 8]
    same = same_document(seg[0], seg[0])
    assert same[4, 7] and same[7, 4] and not same[3, 4] and not same[2, 3]


def test_batch_carries_segments_positions_and_eod_loss_mask():
    batch = {"tokens": TOKENS, "labels": TOKENS.roll(-1, 1), "loss_mask": torch.ones(2, 9)}
    out = DocumentBatching(EOD, document_mask=True, reset_position_ids=True, eod_mask_loss=True).apply(batch)
    assert out["segment_ids"].tolist() == segment_ids_from_tokens(TOKENS, EOD).tolist()
    assert out["position_ids"].tolist()[0] == [0, 1, 2, 0, 0, 1, 2, 3, 0]
    # The loss is dropped exactly where the input is EOD (the target there is the next document's
    # first token), nowhere else.
    assert out["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 1, 0, 1], [1.0] * 9]
    tokens, positions, kwargs = model_inputs(out)
    assert isinstance(kwargs["packed_seq_params"], DocumentSegments)
    assert segments_of(kwargs["packed_seq_params"]) is out["segment_ids"]
    assert positions is out["position_ids"]
    # Each flag alone changes only its own entry.
    only_loss = DocumentBatching(EOD, eod_mask_loss=True).apply(batch)
    assert "segment_ids" not in only_loss and "position_ids" not in only_loss
    tokens, positions, kwargs = model_inputs(only_loss)
    assert kwargs == {} and positions.tolist() == [list(range(9))] * 2
    assert DocumentBatching.from_config(config_from_dict({}).data, EOD) is None


def test_document_segments_are_megatron_packed_params_in_sbhd_layout():
    seg = DocumentSegments(segment_ids=torch.zeros(3, 11, dtype=torch.long))
    assert seg.qkv_format == "sbhd" and seg.max_seqlen_q == seg.max_seqlen_kv == 11
    with pytest.raises(NotImplementedError, match="thd"):
        from megatron.core.packed_seq_params import PackedSeqParams

        segments_of(PackedSeqParams(qkv_format="thd"))


def _cfg(data: dict, **model) -> None:
    base = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 16,
            "attention_layers": ["global"]}
    validate(config_from_dict({"model": {**base, **model}, "data": data}), check_paths=False)


def test_config_keys_default_off_and_are_checked():
    d = config_from_dict({}).data
    assert (d.document_mask, d.reset_position_ids, d.eod_mask_loss) == (False, False, False)
    _cfg({"document_mask": True, "reset_position_ids": True, "eod_mask_loss": True})
    _cfg({"reset_position_ids": True})  # learned positions: reset alone is meaningful
    with pytest.raises(ConfigError, match=r"data.reset_position_ids: with rope .*document_mask"):
        _cfg({"reset_position_ids": True}, position_embedding="rope")
    with pytest.raises(ConfigError, match=r"data.reset_position_ids: with ALiBi"):
        _cfg({"reset_position_ids": True}, position_embedding="none", alibi=True)
    with pytest.raises(ConfigError, match="data.document_mask"):
        config_from_dict({"data": {"document_mask": "yes please"}})
