"""Positions at context parallelism: RoPE (each token rotated by its true position,
megalong/model/context_rope.py) and axial position embeddings at CP=2 in both layouts and with
tensor and pipeline parallelism; the zig-zag layout with TP and PP; grouped-query attention in
every kind that has it at CP=2. 5 training steps whose losses (within 2e-5), gradient norms (1e-4 relative)
and final weights (1e-4) follow one process."""
from __future__ import annotations

from conftest import overrides, read_metrics, run_driver, train_here
from equality import close_losses, close_norms, same_weights
from test_context_parallel import EVERY_KIND, STEPS, ZIGZAG
from test_documents_parallel import short_docs  # noqa: F401 (fixture)

# RoPE with grouped-query attention (2 key/value groups for 4 heads), a local window longer than
# a chunk's first tokens see, learned positions off
ROPE = {
    "model.position_embedding": "rope",
    "model.num_query_groups": 2,
    "model.attention": "{local: {window: 12}}",
}
# RoPE in the zig-zag layout (every layer global) with packed documents (megatron sizes RoPE by
# the packed sequence's length there)
ROPE_ZIGZAG = {
    "model.attention_layers": '[[["global"], 2]]',
    "model.position_embedding": "rope",
    "model.num_query_groups": 2,
    "data.document_mask": "true",
}
# one layer of every kind but lsh (it shares queries and keys: no key groups) with 2 key/value
# groups for 4 heads: every grouped context path in training
EVERY_KIND_GQA = {**EVERY_KIND, "model.num_layers": 5, "model.num_query_groups": 2,
                  "model.attention_layers": '[[["global", "local", "linear", "axial", "fam"], 1]]'}
AXIAL = {"model.position_embedding": "axial", "model.axial_position": "{shape: [8, 8]}"}
ZIGZAG_LAYOUT = {"parallel.context_layout": "zigzag"}
CP2 = {"parallel.context": 2}


def test_positions_and_zigzag_at_context_2_follow_one_process(tiny_data, short_docs, tmp_path):  # noqa: F811
    models = {"rope": (tiny_data, ROPE), "rope_zigzag": (short_docs, ROPE_ZIGZAG),
              "axial": (tiny_data, AXIAL), "zigzag": (short_docs, ZIGZAG),
              "every_gqa": (tiny_data, EVERY_KIND_GQA)}
    for name, (data, model) in models.items():
        train_here(overrides(data, tmp_path / f"{name}_single", **model))
    runs = {  # name: model, parallel layout, processes
        "rope_cp2": ("rope", CP2, 2),
        "rope_zigzag_cp2": ("rope_zigzag", {**CP2, **ZIGZAG_LAYOUT}, 2),
        "axial_cp2": ("axial", CP2, 2),
        "every_gqa_cp2": ("every_gqa", CP2, 2),
        "zigzag_cp2_tp2": ("zigzag", {**CP2, **ZIGZAG_LAYOUT, "parallel.tensor": 2}, 4),
        "zigzag_cp2_pp2": ("zigzag", {**CP2, **ZIGZAG_LAYOUT, "parallel.pipeline": 2}, 4),
        "rope_cp2_tp2": ("rope", {**CP2, "parallel.tensor": 2}, 4),
        "rope_zigzag_cp2_pp2": ("rope_zigzag", {**CP2, **ZIGZAG_LAYOUT, "parallel.pipeline": 2}, 4),
        "axial_cp2_pp2": ("axial", {**CP2, "parallel.pipeline": 2}, 4),
    }
    for procs in (2, 4):
        run_driver([overrides(models[model][0], tmp_path / name, **models[model][1], **layout)
                    for name, (model, layout, p) in runs.items() if p == procs], procs, tmp_path)
    for name, (model, _, _) in runs.items():
        single = tmp_path / f"{model}_single"
        reference = read_metrics(single)
        assert reference[STEPS] < reference[1], model  # it trains
        close_losses(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        close_norms(tmp_path / name, single, name)
        same_weights(tmp_path / name, single, name)
