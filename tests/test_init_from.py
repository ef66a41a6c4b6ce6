"""`train.init_from`: a fresh run from another checkpoint's weights only, into a config that may
differ in the attention kind of any layer (attention surgery); the log's carried/new/dropped table;
errors naming the path or the tensor."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from conftest import tiny_overrides
from megalong.checkpoint import step as ckpt
from megalong.checkpoint.init_from import init_from
from megalong.config import load_config
from megalong.errors import CheckpointError
from megalong.parallel.distributed import shutdown
from megalong.train.loop import train

GLOBAL = '[[["global"], 2]]'
SURGERY = {  # layer 1 becomes this kind; its options
    "local": ("local", "{local: {window: 8}}"),
    "local_global_tokens": ("local", "{local: {window: 8, global_tokens: 2}}"),
    "linear": ("linear", "{linear: {chunk_size: 16}}"),
    "fam": ("fam", "{fam: {block_size: 16, memory_segments: 1, fam_length: 4}}"),
    "lsh": ("lsh", "{lsh: {bucket_size: 8, n_hashes: 2}}"),
    "axial": ("axial", "{axial: {axial_shape: [8, 8]}}"),
}


def _cfg(data, save_dir, steps=2, layers=GLOBAL, attention="{}", **extra):
    args = tiny_overrides(data, save_dir, steps, **{"model.attention_layers": layers,
                                                    "model.attention": attention, **extra})
    return load_config([], [a for a in args if a != "--set"])


def _train(cfg):
    try:
        return train(cfg)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory):
    """A global-attention model trained 3 steps: its checkpoint directory."""
    return _train(_cfg(tiny_data, tmp_path_factory.mktemp("source"), steps=3,
                       **{"train.lr": 3e-3})).checkpoint


def _weights(path):
    return {k: v for k, v in ckpt.load_merged_state(path)[1].items()}


def _model(cfg, seed=0):
    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.model.gpt import build_model

    torch.manual_seed(seed)
    return build_model(cfg, SentencePieceTokenizer(cfg.data.tokenizer).vocab_size).eval()


def test_same_config_reproduces_the_source_logits_and_starts_fresh(tiny_data, source, tmp_path, caplog):
    """Into the source's own config: every tensor is carried and the logits are the source's
    (its weights loaded strictly) bit for bit; a run with init_from starts at step 1 (not the
    source's step 3) from the trained weights (its first loss is far from a fresh run's) and logs
    the table."""
    from megalong.model.gpt import position_ids_for
    from megalong.parallel.distributed import initialize

    cfg = _cfg(tiny_data, tmp_path, steps=1, **{"train.init_from": str(source)})
    tokens = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    layout = initialize(1)
    try:
        ours = _model(cfg, seed=1)
        report = init_from(source, cfg, ours, layout)
        theirs = _model(cfg, seed=2)
        state = _weights(source)
        theirs.load_state_dict({**theirs.state_dict(), **state}, strict=True)
        with torch.no_grad():
            a = ours(tokens, position_ids_for(tokens), None)
            b = theirs(tokens, position_ids_for(tokens), None)
            fresh = _model(cfg, seed=1)(tokens, position_ids_for(tokens), None)
    finally:
        shutdown()
    assert sorted(report.carried) == sorted(state) and not report.new and not report.dropped
    assert torch.equal(a, b)
    assert (a - fresh).abs().max().item() > 1e-3  # the comparison can fail
    with caplog.at_level(logging.INFO, logger="megalong"):
        result = _train(cfg)
    assert sorted(result.losses) == [1] and result.checkpoint == tmp_path / "step_00000001"
    log = caplog.text
    assert f"train.init_from: weights from {source} ({len(state)} carried, 0 new, 0 dropped" in log
    assert "carried  decoder.layers.1.self_attention.linear_qkv.weight" in log
    scratch = _train(_cfg(tiny_data, tmp_path / "fresh", steps=1))
    assert scratch.losses[1] - result.losses[1] > 0.1, (scratch.losses, result.losses)


@pytest.mark.parametrize("case", sorted(SURGERY))
def test_surgery_from_global_to_every_kind_trains(tiny_data, source, tmp_path, case):
    """Layer 1 becomes another kind: q/k/v/o and MLP weights carry over, the run trains two finite
    steps, and the weights the kind adds are reported new (initialised as the kind documents)."""
    kind, options = SURGERY[case]
    cfg = _cfg(tiny_data, tmp_path, steps=2, layers=f'[[["global", "{kind}"], 1]]', attention=options,
               **{"train.init_from": str(source)})
    from megalong.parallel.distributed import initialize

    layout = initialize(1)
    try:
        model = _model(cfg)
        report = init_from(source, cfg, model, layout)
    finally:
        shutdown()
    assert "decoder.layers.1.self_attention.linear_proj.weight" in report.carried
    assert "decoder.layers.1.mlp.linear_fc1.weight" in report.carried
    if case == "lsh":  # shared QK: the source's queries and values, its keys left out
        assert "decoder.layers.1.self_attention.linear_qkv.weight" in report.converted
    if case == "local_global_tokens":
        assert any("linear_qkv_global" in name for name in report.new), report.new
    result = _train(cfg)
    assert sorted(result.losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_dropped_and_new_tensors_show_in_the_report(tiny_data, tmp_path, caplog):
    """local with global tokens -> global drops the global-token projections; the reverse adds them."""
    options = SURGERY["local_global_tokens"][1]
    tokens_src = _train(_cfg(tiny_data, tmp_path / "src", steps=1, layers='[[["global", "local"], 1]]',
                             attention=options)).checkpoint
    with caplog.at_level(logging.INFO, logger="megalong"):
        _train(_cfg(tiny_data, tmp_path / "dst", steps=1, **{"train.init_from": str(tokens_src)}))
    assert "dropped  decoder.layers.1.self_attention.linear_qkv_global.weight" in caplog.text
    assert re.search(r"\d+ carried, 0 new, [1-9]\d* dropped", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megalong"):
        _train(_cfg(tiny_data, tmp_path / "back", steps=1, layers='[[["global", "local"], 1]]',
                    attention=options, **{"train.init_from": str(tmp_path / "dst")}))
    assert "new      decoder.layers.1.self_attention.linear_qkv_global.weight" in caplog.text


def test_errors_name_the_path_and_the_tensor(tiny_data, source, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"train.init_from: {missing} does not exist"):
        _train(_cfg(tiny_data, tmp_path / "a", **{"train.init_from": str(missing)}))
    with pytest.raises(CheckpointError, match=r"train.init_from: .*tensor decoder.layers.0.mlp.linear_fc1.weight "
                                              r"has shape \(256, 64\), the model's .* has \(128, 64\)"):
        _train(_cfg(tiny_data, tmp_path / "b", **{"train.init_from": str(source), "model.ffn_hidden_size": 128}))


def test_shared_qk_takes_the_queries_and_values_of_each_head():
    """A global layer's fused [q_h, k_h, v_h] rows become lsh's [q_h, v_h] (keys left out)."""
    from megalong.checkpoint.init_from import shared_qk
    from megalong.config import config_from_dict

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
                                      "attention_layers": [[["global", "lsh"], 1]]}})
    fused = torch.arange(24 * 3).reshape(24, 3)  # 2 heads x (q, k, v) x 4 rows
    heads = fused.reshape(2, 3, 4, 3)
    out = shared_qk("decoder.layers.1.self_attention.linear_qkv.weight", fused, cfg)
    assert torch.equal(out, torch.cat([heads[0, 0], heads[0, 2], heads[1, 0], heads[1, 2]]))
    assert shared_qk("decoder.layers.0.self_attention.linear_qkv.weight", fused, cfg) is None  # global stays


def test_a_hugging_face_folder_loads_as_its_import_does(tiny_data, tmp_path):
    """init_from a Llama folder: every tensor carried, and the logits are those of the folder's
    `megalong import` checkpoint loaded strictly, bit for bit; with half its layers turned local,
    the global ones' weights are the same."""
    from test_import import hf_model, save_hf

    from megalong.config import config_from_dict
    from megalong.hf_import.write import import_hf
    from megalong.model.gpt import position_ids_for
    from megalong.parallel.distributed import initialize

    folder = save_hf(hf_model("llama"), tmp_path / "hf", tiny_data.tokenizer)
    try:
        step_dir = import_hf(folder, tmp_path / "imported")
    finally:
        shutdown()
    info, state = ckpt.load_merged_state(step_dir)
    cfg = info.config
    raw = cfg.to_dict()
    raw["model"]["attention_layers"] = [[["global", "local"], 2]]
    raw["model"]["attention"] = {"local": {"window": 8}}
    surgery = config_from_dict(raw)
    tokens = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    layout = initialize(1)
    try:
        ours = _model(cfg, seed=1)
        report = init_from(folder, cfg, ours, layout)
        theirs = _model(cfg, seed=2)
        theirs.load_state_dict({**theirs.state_dict(), **state}, strict=True)
        with torch.no_grad():
            assert torch.equal(ours(tokens, position_ids_for(tokens), None), theirs(tokens, position_ids_for(tokens), None))
        local = _model(surgery, seed=3)
        surgery_report = init_from(folder, surgery, local, layout)
    finally:
        shutdown()
    assert sorted(report.carried) == sorted(state) and not report.new and not report.dropped
    assert sorted(surgery_report.carried) == sorted(state)
    assert torch.equal(local.state_dict()["decoder.layers.1.self_attention.linear_qkv.weight"],
                       state["decoder.layers.1.self_attention.linear_qkv.weight"])


def _table(rows: list[str]) -> list[str]:
    """The init_from table's lines among a log's messages, the source path left out."""
    start = next(i for i, line in enumerate(rows) if line.startswith("train.init_from: weights from"))
    table = [rows[start].split(" (", 1)[1]]
    return table + [line for line in rows[start + 1:] if line.startswith("  ")]


def test_tensor_and_pipeline_parallel_load_the_whole_model_and_report_it_once(tiny_data, source, tmp_path, caplog):
    """init_from into TP=2 and into PP=2 (one layer per stage; layer 1 turned local with global
    tokens, so there are new tensors on the second stage only): the first loss is the one-process
    run's within 2e-5, and rank 0's table is the one-process table, line for line (no tensor of
    the other stage reported dropped, the second stage's new ones listed)."""
    from conftest import read_metrics, run_driver

    layers, options = '[[["global", "local"], 1]]', SURGERY["local_global_tokens"][1]

    def args(save_dir, **extra):
        return [a for a in tiny_overrides(tiny_data, save_dir, 1, **{
            "model.attention_layers": layers, "model.attention": options, "train.init_from": str(source),
            **extra}) if a != "--set"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the spawned processes (OMP_NUM_THREADS=1)
    try:
        with caplog.at_level(logging.INFO, logger="megalong"):
            one = _train(load_config([], args(tmp_path / "one")))
    finally:
        torch.set_num_threads(threads)
    want = _table([record.getMessage() for record in caplog.records])
    assert "0 dropped" in want[0] and re.search(r"[1-9]\d* new", want[0]), want[0]
    assert any(line.startswith("  new      decoder.layers.1.self_attention.linear_qkv_global") for line in want)
    layouts = {"tp2": {"parallel.tensor": 2}, "pp2": {"parallel.pipeline": 2}}
    run_driver([args(tmp_path / name, **extra) for name, extra in layouts.items()], 2, tmp_path)
    for name in layouts:
        loss = read_metrics(tmp_path / name)[1]
        assert abs(loss - one.losses[1]) < 2e-5, (name, loss, one.losses[1])
        # the CLI's format: "HH:MM:SS message"
        got = _table([line[9:] for line in (tmp_path / name / "train.log").read_text().splitlines()])
        assert got == want, (name, got[:3], want[:3])
