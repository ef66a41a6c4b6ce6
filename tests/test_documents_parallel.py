"""Training with data.document_mask (plus reset positions and the EOD loss mask) at TP=2, PP=2,
TP=2 x PP=2, EP=2 x TP=2, a reversible PP=2 stack, with megatron's full and selective recompute
(TP=2; full also at PP=2) and with the DeepSpeed engine (ZeRO-1, TP=2), in one 4-process gloo job, each against one
process: the segment ids reach every stage's attention from the tokens that stage reads, and the
recomputed forward sees them as the first one did."""
from __future__ import annotations

import builtins
import importlib.util
import json

import numpy as np
import pytest

from conftest import TinyData, read_metrics, run_driver, tiny_overrides, train_here
from equality import LOSS_TOL, close_losses, close_norms

STEPS = 3
MODEL = {
    "model.num_layers": 4,
    "model.attention_layers": '[[["global", "local", "linear", "local"], 1]]',
    "model.attention": "{local: {window: 8}, linear: {chunk_size: 16}}",
    "model.mlp_layers": '[[["dense", "moe"], 2]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5}",
    "train.micro_batch_size": 1,
    "data.document_mask": "true",
    "data.reset_position_ids": "true",
    "data.eod_mask_loss": "true",
}
LAYOUTS = {
    "tp2": {"parallel.tensor": 2},
    "pp2": {"parallel.pipeline": 2},
    "tp2_pp2": {"parallel.tensor": 2, "parallel.pipeline": 2},
    "ep2_tp2": {"parallel.expert": 2, "parallel.tensor": 2},
    "tp2_full_recompute": {"parallel.tensor": 2, "execution.recompute_granularity": "full",
                           "execution.recompute_method": "uniform", "execution.recompute_num_layers": 1},
    "tp2_selective_recompute": {"parallel.tensor": 2, "execution.recompute_granularity": "selective"},
    # 1F1B: stage 0 runs two micro-batches' forwards before the first backward
    "pp2_full_recompute": {"parallel.pipeline": 2, "execution.recompute_granularity": "full",
                           "execution.recompute_method": "uniform", "execution.recompute_num_layers": 1},
}
if importlib.util.find_spec("deepspeed") is not None:
    LAYOUTS["deepspeed_zero1_tp2"] = {"train.engine": "deepspeed", "deepspeed.zero_stage": 1, "parallel.tensor": 2}
REVERSIBLE = {"model.reversible": "true"}


def _args(data, save_dir, **extra) -> list[str]:
    return [a for a in tiny_overrides(data, save_dir, STEPS, **{**MODEL, **extra}) if a != "--set"]


@pytest.fixture(scope="module")
def short_docs(tiny_data, tmp_path_factory) -> TinyData:
    """The first paragraph of every builtin's docstring as one document each (about 24 tokens):
    a 64-token sample packs several documents."""
    from megalong.data.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("short_docs")
    texts = [obj.__doc__.split("\n\n")[0] for obj in vars(builtins).values() if getattr(obj, "__doc__", None)]
    corpus = root / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(PreprocessOptions([str(corpus)], str(root / "short"), tiny_data.tokenizer, workers=1))
    return TinyData(tokenizer=tiny_data.tokenizer, prefix=str(root / "short"))


def test_samples_hold_several_documents(short_docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(short_docs.prefix)
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the index is an mmap
    del dataset
    assert len(lengths) > 100 and np.median(lengths) < 32  # seq_length 64 (tiny_overrides)


def test_document_mask_training_in_every_layout_equals_one_process(short_docs, tmp_path):
    single, single_rev, no_mask = tmp_path / "single", tmp_path / "single_rev", tmp_path / "no_mask"
    train_here(_args(short_docs, single))
    train_here(_args(short_docs, single_rev, **REVERSIBLE))
    train_here(_args(short_docs, no_mask, **{"data.document_mask": "false"}))
    reference = read_metrics(single)
    # The mask changes what is computed (the same data and weights give another loss without it).
    assert abs(read_metrics(no_mask)[1] - reference[1]) > 10 * LOSS_TOL
    runs = [_args(short_docs, tmp_path / name, **layout) for name, layout in LAYOUTS.items()]
    runs.append(_args(short_docs, tmp_path / "pp2_rev", **{"parallel.pipeline": 2}, **REVERSIBLE))
    run_driver(runs, 4, tmp_path)
    for name in LAYOUTS:
        close_losses(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        close_norms(tmp_path / name, single, name)
    close_losses(read_metrics(tmp_path / "pp2_rev"), read_metrics(single_rev), range(1, STEPS + 1), "pp2_rev")
    close_norms(tmp_path / "pp2_rev", single_rev, "pp2_rev")
