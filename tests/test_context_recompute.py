"""Context parallelism (`parallel.context`) with layers that run their forward again in the
backward: reversible stacks (`model.reversible`) and megatron-core's full and selective activation
recompute, whose recomputed forwards exchange halos, ring blocks, states and gathers again; and
`execution.compile`, whose compiled layers break their graphs at those exchanges; and DeepSpeed's
ZeRO-1/2/3 over the data x context ranks, resumed from its checkpoint (when DeepSpeed, an optional
extra, is installed). Every run follows one process: losses within 2e-5, gradient norms within
1e-4 relative, weights within 1e-4."""
from __future__ import annotations

import importlib.util

from conftest import overrides, read_metrics, run_driver, train_here
from equality import close_losses, close_norms, same_weights
from test_context_parallel import EVERY_KIND, MIXED, STEPS

REVERSIBLE = {"model.reversible": "true"}
FULL = {"execution.recompute_granularity": "full", "execution.recompute_method": "uniform",
        "execution.recompute_num_layers": 1}
SELECTIVE = {"execution.recompute_granularity": "selective"}
CP2, CP2_PP2 = {"parallel.context": 2}, {"parallel.context": 2, "parallel.pipeline": 2}
DEEPSPEED = {"train.engine": "deepspeed", **CP2}
# name: model, layout, processes, one-process reference (recompute does not change the plain model)
RUNS = {
    "reversible_cp2": ({**EVERY_KIND, **REVERSIBLE}, CP2, 2, "every_reversible"),
    "full_cp2": ({**EVERY_KIND, **FULL}, CP2, 2, "every"),
    "selective_cp2": ({**EVERY_KIND, **SELECTIVE}, CP2, 2, "every"),
    # dynamo's aot_eager backend (tests/test_compile.py): the graphs, their breaks at the exchanges
    # and aot_autograd's backward, without inductor's code generation (CI time)
    "compiled_cp2": ({**MIXED, "execution.compile": "true"}, CP2, 2, "mixed"),
    "compiled_reversible_cp2": ({**MIXED, **REVERSIBLE, "execution.compile": "true"}, CP2, 2, "mixed_reversible"),
    # DeepSpeed: ZeRO over the data x context ranks; ZeRO-3 stopped at step 3 and resumed
    "zero1_cp2": (MIXED, {**DEEPSPEED, "deepspeed.zero_stage": 1}, 2, "mixed"),
    "zero3_cp2": (MIXED, {**DEEPSPEED, "deepspeed.zero_stage": 3, "train.stop_at_step": 3}, 2, "mixed"),
    "zero3_cp2_resumed": (MIXED, {**DEEPSPEED, "deepspeed.zero_stage": 3, "train.load": "auto"}, 2, "mixed"),
    "reversible_cp2_pp2": ({**EVERY_KIND, **REVERSIBLE}, CP2_PP2, 4, "every_reversible"),
    "full_cp2_pp2": ({**EVERY_KIND, **FULL}, CP2_PP2, 4, "every"),
    "zero2_cp2_dp2": (MIXED, {**DEEPSPEED, "deepspeed.zero_stage": 2}, 4, "mixed"),
}
SAVE_DIRS = {"zero3_cp2": "zero3_cp2_resumed"}  # both runs write one directory
if importlib.util.find_spec("deepspeed") is None:
    RUNS = {name: run for name, run in RUNS.items() if run[1].get("train.engine") != "deepspeed"}
REFERENCES = {"every": EVERY_KIND, "every_reversible": {**EVERY_KIND, **REVERSIBLE}, "mixed": MIXED,
              "mixed_reversible": {**MIXED, **REVERSIBLE}}


def test_recompute_reversible_and_compile_at_context_2_equal_one_process(tiny_data, tmp_path, monkeypatch):
    for name, model in REFERENCES.items():
        train_here(overrides(tiny_data, tmp_path / name, **model))
    monkeypatch.setenv("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:aot_eager")  # read by the spawned driver
    for procs in (2, 4):
        run_driver([overrides(tiny_data, tmp_path / SAVE_DIRS.get(name, name), **model, **layout)
                    for name, (model, layout, p, _) in RUNS.items() if p == procs], procs, tmp_path)
    for name, (_, _, _, reference) in RUNS.items():
        if name in SAVE_DIRS:
            continue
        single = tmp_path / reference
        assert read_metrics(single)[STEPS] < read_metrics(single)[1], reference  # it trains
        close_losses(read_metrics(tmp_path / name), read_metrics(single), range(1, STEPS + 1), name)
        close_norms(tmp_path / name, single, name)
        same_weights(tmp_path / name, single, name)
