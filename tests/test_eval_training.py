"""Evaluation during training and of its checkpoint: with two data.train datasets, the held-out loss
of each (valid/<name>/loss) against a hand computation; train.eval_tasks logs an lm-eval task's
metric, the same that `megalong eval --tasks` gives for the checkpoint; `megalong eval
--per-dataset` gives the hand-computed losses too, also under data.document_mask (against every
packed document run alone)."""
from __future__ import annotations

import json
import os

import pytest

from conftest import read_metrics, tiny_overrides
from test_documents_parallel import short_docs  # noqa: F401 (a fixture)
from test_eval_harness import write_tasks

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ = 64


def upper_case_dataset(tiny_data, root) -> str:
    """A second dataset: the corpus's documents in capitals (another distribution, same tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megalong.data.preprocess import PreprocessOptions, preprocess
    from megalong.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tiny_data.tokenizer)
    docs = IndexedDataset(tiny_data.prefix)
    lines = [json.dumps({"text": tokenizer.decode([int(t) for t in docs[i][:-1]]).upper()}) for i in range(len(docs))]
    (root / "upper.jsonl").write_text("\n".join(lines) + "\n")
    preprocess(PreprocessOptions([str(root / "upper.jsonl")], str(root / "upper"), tiny_data.tokenizer, workers=1))
    return str(root / "upper")


def held_out(checkpoint, prefixes: dict[str, str], samples: int):
    """(the one-process model of `checkpoint`, its tokenizer, per prefix name the held-out
    GPTDataset of that prefix alone, `samples` samples)."""
    from megalong.data.datasets import build_gpt_datasets
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.generate import load_for_inference

    model, cfg, _ = load_for_inference(checkpoint)
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    return model, tokenizer, {name: build_gpt_datasets([(1.0, prefix)], "90,10,0", SEQ, 1234, tokenizer,
                                                       (0, samples, 0), None)[1]
                              for name, prefix in prefixes.items()}


def hand_losses(checkpoint, prefixes: dict[str, str], samples: int) -> dict[str, float]:
    """Per prefix: the one-process model's mean cross-entropy over the first `samples` samples of
    that prefix's own held-out GPTDataset."""
    import torch
    import torch.nn.functional as F

    from megalong.parallel.distributed import shutdown

    out = {}
    try:
        model, tokenizer, held_out_sets = held_out(checkpoint, prefixes, samples)
        for name, valid in held_out_sets.items():
            tokens = torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(samples)])
            labels = torch.stack([torch.as_tensor(valid[i]["labels"]) for i in range(samples)])
            with torch.no_grad():
                logits = model(tokens, torch.arange(SEQ).expand(samples, SEQ), None)
            out[name] = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten()).item()
    finally:
        shutdown()
    return out


def test_per_dataset_held_out_and_tasks_during_training_and_from_the_checkpoint(tiny_data, tmp_path):
    pytest.importorskip("lm_eval")
    from megalong.cli import main
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    upper = upper_case_dataset(tiny_data, tmp_path)
    tasks = write_tasks(tmp_path / "tasks")
    save = tmp_path / "run"
    args = tiny_overrides(tiny_data, save, 2, **{
        "data.train": f"[{{path: {tiny_data.prefix}, name: lower}}, {{path: {upper}, name: upper}}]",
        "train.eval_tasks": "[tiny_choice]", "train.eval_tasks_include_path": str(tasks)})
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    samples = 4  # train.eval_iters 1 x global_batch_size 4
    expected = hand_losses(save, {"lower": tiny_data.prefix, "upper": upper}, samples)
    for name, loss in expected.items():
        assert read_metrics(save, f"valid/{name}/loss")[2] == pytest.approx(loss, rel=1e-5), name
    assert abs(expected["lower"] - expected["upper"]) > 1e-3  # two datasets, two losses
    acc = read_metrics(save, "eval/tiny_choice/acc")[2]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)

    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(save), "--per-dataset", "--tokens", str(samples * SEQ), "--output", str(out),
                 "--tasks", "tiny_choice", "--include-path", str(tasks)]) == 0
    records = {k: v for line in out.read_text().splitlines() for k, v in json.loads(line).items()}
    assert records["step"] == 2 and records["eval/tiny_choice/acc"] == acc
    for name, loss in expected.items():
        assert records[f"valid/{name}/loss"] == pytest.approx(loss, rel=1e-5), name


def document_losses(checkpoint, prefixes: dict[str, str], samples: int) -> dict[str, tuple[float, float]]:
    """Per prefix: (the loss with every packed document of a held-out sample run alone, at its
    positions in the sample; the loss of the whole samples unmasked). A document ends at its EOD."""
    import torch
    import torch.nn.functional as F

    from megalong.parallel.distributed import shutdown

    out = {}
    try:
        model, tokenizer, held_out_sets = held_out(checkpoint, prefixes, samples)
        for name, valid in held_out_sets.items():
            alone, whole, pieces = [], [], 0
            for i in range(samples):
                tokens = torch.as_tensor(valid[i]["tokens"])
                labels = torch.as_tensor(valid[i]["labels"])
                ends = [int(e) + 1 for e in (tokens == tokenizer.eod).nonzero().flatten()]
                bounds = [0] + [e for e in ends if e < SEQ] + [SEQ]
                with torch.no_grad():
                    for a, b in zip(bounds, bounds[1:]):
                        logits = model(tokens[None, a:b], torch.arange(a, b)[None], None)[0]
                        alone.append(F.cross_entropy(logits.double(), labels[a:b], reduction="none"))
                        pieces += 1
                    logits = model(tokens[None], torch.arange(SEQ)[None], None)[0]
                whole.append(F.cross_entropy(logits.double(), labels, reduction="none"))
            assert pieces > 2 * samples  # several documents per sample
            out[name] = (torch.cat(alone).mean().item(), torch.cat(whole).mean().item())
    finally:
        shutdown()
    return out


def test_per_dataset_losses_under_document_mask_are_those_of_each_document_alone(
        tiny_data, short_docs, tmp_path):  # noqa: F811 (short_docs: the imported fixture)
    from megalong.cli import main
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    save = tmp_path / "run"
    args = tiny_overrides(tiny_data, save, 1, **{
        "data.train": f"[{{path: {short_docs.prefix}, name: short}}, {{path: {tiny_data.prefix}, name: long}}]",
        "data.document_mask": "true"})
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    samples = 3
    expected = document_losses(save, {"short": short_docs.prefix}, samples)
    masked, unmasked = expected["short"]
    assert abs(masked - unmasked) > 1e-3  # the mask changes these losses
    out = tmp_path / "eval.jsonl"
    assert main(["eval", str(save), "--per-dataset", "--tokens", str(samples * SEQ), "--output", str(out)]) == 0
    records = {k: v for line in out.read_text().splitlines() for k, v in json.loads(line).items()}
    assert records["valid/short/loss"] == pytest.approx(masked, rel=1e-5)
    assert "valid/long/loss" in records


@pytest.mark.parametrize("extra, world, message", [
    ({"parallel": {"context": 2}}, 2, r"train\.eval_tasks: not with parallel\.context > 1"),
    ({"parallel": {"pipeline": 2, "virtual_stages": 2}, "model": {"num_layers": 4, "attention_layers": [[["global"], 4]]}}, 2,
     r"train\.eval_tasks: not with parallel\.virtual_stages > 1"),
    ({"train": {"eval_tasks": [""]}}, 1, r"train\.eval_tasks\[0\]: expected an lm-eval task name"),
    ({"data": {"train": [{"path": "a", "name": "x"}, {"path": "b", "name": "x"}]}}, 1,
     r"data\.train: two entries share a name"),
])
def test_eval_tasks_layouts_it_cannot_run_are_refused_by_name(extra, world, message):
    from megalong.config import ConfigError, config_from_dict, validate

    raw = {"train": {"eval_tasks": ["tiny_choice"], **extra.get("train", {})},
           **{k: v for k, v in extra.items() if k != "train"}}
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict(raw), world_size=world, check_paths=False)
