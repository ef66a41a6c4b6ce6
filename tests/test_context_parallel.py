"""Context parallelism (`parallel.context`): attention of every supported kind on N gloo
processes, each holding a chunk of the sequence, equals one process (forward and gradients,
float64, tests/context_attention_driver.py); training at CP=2 follows the one-process run; the
combinations not supported are refused by name."""
from __future__ import annotations


import pytest

from conftest import overrides, read_metrics, run_driver, run_script, train_here
from test_documents_parallel import short_docs  # noqa: F401 (fixture)
from equality import LOSS_TOL, close_losses, close_norms, same_weights
from megalong.config import ConfigError, load_config

STEPS = 5
# global, local with per-head dilations and global tokens, and linear layers (efficient normalisation;
# elu is in LINEAR_DOCUMENTS), learned positions (offset per chunk)
MIXED = {
    "model.num_layers": 3,
    "model.attention_layers": '[[["global", "local", "linear"], 1]]',
    "model.attention": "{local: {window: 8, dilation: [1, 2, 1, 3], global_tokens: [0, 5, 40]}, "
                       "linear: {chunk_size: 16, normalization: efficient}}",
}
# ALiBi (distances across chunks), a local window longer than a chunk (40 > 64 / 2), packed documents
ALIBI_DOCUMENTS = {
    "model.attention_layers": '[[["global", "local"], 1]]',
    "model.attention": "{local: {window: 40, dilation: [1, 1, 2, 2]}}",
    "model.alibi": "true",
    "model.position_embedding": "none",
    "data.document_mask": "true",
    "data.eod_mask_loss": "true",
}
# linear attention's state scan across documents (and local) with packed documents, learned positions
LINEAR_DOCUMENTS = {
    "model.attention_layers": '[[["linear", "local"], 1]]',
    "model.attention": "{local: {window: 12}, linear: {chunk_size: 8}}",
    "data.document_mask": "true",
}
# the FAM chain and linear's efficient normalisation (rescaled states) across documents and ranks
FAM_LINEAR_DOCUMENTS = {
    "model.attention_layers": '[[["fam", "linear"], 1]]',
    "model.attention": ("{fam: {block_size: 8, memory_segments: 1, fam_length: 2}, "
                        "linear: {chunk_size: 8, normalization: efficient}}"),
    "data.document_mask": "true",
}
# ring attention in the zig-zag layout (every layer global), ALiBi and packed documents
ZIGZAG = {
    "model.attention_layers": '[[["global"], 2]]',
    "model.alibi": "true",
    "model.position_embedding": "none",
    "data.document_mask": "true",
}

# Every kind, one layer each: chunks of 32 at CP=2 hold whole axial rows (8) and FAM blocks (8);
# the FAM state crosses ranks, the LSH buckets span the whole sequence.
EVERY_KIND = {
    "model.num_layers": 6,
    "model.attention_layers": '[[["global", "local", "linear", "lsh", "axial", "fam"], 1]]',
    "model.attention": ("{local: {window: 8, dilation: [1, 2, 1, 3]}, linear: {chunk_size: 16}, "
                        "lsh: {bucket_size: 8, n_hashes: 2}, axial: {axial_shape: [8, 8]}, "
                        "fam: {block_size: 8, memory_segments: 1, fam_length: 2}}"),
}
EVERY_KIND_LAYOUTS = {  # name: layout, processes
    "every_cp2": ({"parallel.context": 2}, 2),
    "every_cp2_tp2": ({"parallel.context": 2, "parallel.tensor": 2}, 4),
    "every_cp2_pp2": ({"parallel.context": 2, "parallel.pipeline": 2}, 4),
}


@pytest.mark.parametrize("n", [2, 4])
def test_context_attention_equals_one_process(n):
    """Every kind (tests/context_attention_driver.py), and with grouped keys and values
    (tests/context_gqa_driver.py, in the same job): the messages carry the groups, not copies."""
    out = run_script("context_attention_driver.py", n)
    assert f"cases equal one process, 4 refused, at CP={n}" in out
    assert f"grouped-query attention at CP={n}: 14 cases equal one process" in out
    assert "global: 2.00x" in out and "local alibi dilations: 2.00x" in out


def test_training_at_context_2_equals_one_process(tiny_data, short_docs, tmp_path):  # noqa: F811
    """Losses within 2e-5, gradient norms within 1e-4 relative and the final weights within 1e-4
    of one process, for both models, through megatron-core's DDP over the data x context ranks;
    CP=2 x DP=2 with the distributed optimizer; checkpoints saved at CP=1 resume at CP=2 and the
    reverse (also from the zig-zag layout)."""
    models = {"mixed": (tiny_data, MIXED, {}), "alibi_documents": (short_docs, ALIBI_DOCUMENTS, {}),
              "zigzag": (short_docs, ZIGZAG, {"parallel.context_layout": "zigzag"}),
              "linear_documents": (short_docs, LINEAR_DOCUMENTS, {}),
              "fam_linear_documents": (short_docs, FAM_LINEAR_DOCUMENTS, {})}
    save = {"train.save_interval": 3}
    for name, (data, model, _) in models.items():
        train_here(overrides(data, tmp_path / f"{name}_single", **model, **save))
    cp2 = {"parallel.context": 2}
    runs = [overrides(data, tmp_path / f"{name}_cp2", **model, **cp2, **layout, **save)
            for name, (data, model, layout) in models.items()]
    runs.append(overrides(tiny_data, tmp_path / "mixed_resumed_cp2", **MIXED, **cp2,
                      **{"train.load": str(tmp_path / "mixed_single" / "step_00000003")}))
    run_driver(runs, 2, tmp_path)
    run_driver([overrides(tiny_data, tmp_path / "mixed_dp2_cp2", **MIXED, **cp2, **{
        "parallel.distributed_optimizer": "true", "parallel.overlap_grad_reduce": "true",
        "parallel.ddp_bucket_size": 20000})], 4, tmp_path)
    train_here(overrides(tiny_data, tmp_path / "mixed_from_cp2", **MIXED,
                      **{"train.load": str(tmp_path / "mixed_cp2" / "step_00000003")}))
    train_here(overrides(short_docs, tmp_path / "zigzag_from_cp2", **ZIGZAG,  # saved in the zig-zag layout
                      **{"train.load": str(tmp_path / "zigzag_cp2" / "step_00000003")}))
    for name in models:
        single, run = tmp_path / f"{name}_single", tmp_path / f"{name}_cp2"
        reference = read_metrics(single)
        assert reference[STEPS] < reference[1], name  # it trains
        close_losses(read_metrics(run), reference, range(1, STEPS + 1), name)
        close_norms(run, single, name)
        same_weights(run, single, name)
        held_out, want = read_metrics(run, "valid/loss"), read_metrics(single, "valid/loss")
        assert held_out.keys() == want.keys() == {STEPS}, name  # the evaluation's loss too
        assert abs(held_out[STEPS] - want[STEPS]) < LOSS_TOL, name
    for name, steps, single in (("mixed_dp2_cp2", range(1, STEPS + 1), tmp_path / "mixed_single"),
                                ("mixed_resumed_cp2", range(4, STEPS + 1), tmp_path / "mixed_single"),
                                ("mixed_from_cp2", range(4, STEPS + 1), tmp_path / "mixed_single"),
                                ("zigzag_from_cp2", range(4, STEPS + 1), tmp_path / "zigzag_single")):
        close_losses(read_metrics(tmp_path / name), read_metrics(single), steps, name)
        norms, reference = (read_metrics(d, "train/grad_norm") for d in (tmp_path / name, single))
        for step in steps:
            assert abs(norms[step] - reference[step]) < 1e-4 * reference[step], (name, step)
        same_weights(tmp_path / name, single, name)
    assert LOSS_TOL == 2e-5


def test_every_kind_at_context_2_with_tensor_and_pipeline_parallel(tiny_data, tmp_path):
    """A model with one layer of each kind at CP=2, CP=2 x TP=2 and CP=2 x PP=2: losses within
    2e-5, gradient norms within 1e-4 relative and weights within 1e-4 of one process."""
    single = tmp_path / "every_single"
    train_here(overrides(tiny_data, single, **EVERY_KIND))
    for procs in (2, 4):
        run_driver([overrides(tiny_data, tmp_path / name, **EVERY_KIND, **layout)
                    for name, (layout, p) in EVERY_KIND_LAYOUTS.items() if p == procs], procs, tmp_path)
    reference = read_metrics(single)
    assert reference[STEPS] < reference[1]
    for name in EVERY_KIND_LAYOUTS:
        close_losses(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        close_norms(tmp_path / name, single, name)
        same_weights(tmp_path / name, single, name)


@pytest.mark.parametrize("extra, words", [
    ({"parallel.context": 3}, "parallel.context: 3 does not divide the sequence length 64"),
    ({"parallel.context": 4, "model.attention_layers": '[[["global", "fam"], 1]]',
      "model.attention": "{fam: {block_size: 32, fam_length: 2}}"}, "not whole blocks of model.attention.fam.block_size"),
    ({"parallel.context": 4, "model.attention_layers": '[[["global", "axial"], 1]]',
      "model.attention": "{axial: {axial_shape: [2, 32]}}"}, "not whole rows of model.attention.axial.axial_shape"),
    ({"parallel.context": 2, "parallel.context_layout": "zigzag"}, "zigzag needs every attention layer global"),
    ({"parallel.context": 2, "model.attention_dropout": 0.1}, "model.attention_dropout with global attention"),
    ({"parallel.context": 8}, "does not divide the 4 processes"),
])
def test_unsupported_context_layouts_are_refused_by_name(tiny_data, tmp_path, extra, words):
    with pytest.raises(ConfigError) as error:
        load_config([], overrides(tiny_data, tmp_path / "run", **extra), world_size=4)
    message = str(error.value)
    assert words in message and message.startswith("parallel.context") and "\n" not in message
