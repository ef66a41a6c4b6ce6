"""MoE layers at context parallelism (`parallel.context`): each rank routes its chunk of the
sequence, the router's auxiliary losses and the aux-loss-free bias loads are those of the whole
sequence (sums over the context group), expert parallelism exchanges every chunk's tokens. Training
at CP=2 (top-2, switch in the zig-zag layout, noisy top-2), CP=2 x EP=2 (x DP=2), CP=2 x TP=2 x EP=2
and CP=2 x PP=2 follows one process; capacity drops are per chunk (tests/context_moe_driver.py checks them and the
whole-sequence aux loss's value and gradient)."""
from __future__ import annotations


from conftest import overrides, read_metrics, run_driver, run_script, train_here
from equality import close_losses, close_norms, same_weights

STEPS = 5
# Top-2 of 4 experts, one shared expert, the load-balance loss (coefficient large enough to
# matter) with the z-loss, and aux-loss-free bias balancing. A capacity factor of 2 with top-2 of
# 4 gives every expert room for every token of a chunk: it never drops, so the runs can agree.
MOE = {
    "model.mlp_layers": '[[["moe", "dense"], 1]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 2.0, num_shared_experts: 1, "
                 "aux_loss_coeff: 0.1, z_loss_coeff: 0.01, bias_update_rate: 0.01}",
}
SWITCH = {  # top-1, dropless, in a model of global layers only (ring attention), zig-zag layout
    "model.attention_layers": '[[["global"], 2]]',
    "model.mlp_layers": '[[["dense", "moe"], 1]]',
    "model.moe": "{num_experts: 4, router: switch, top_k: 1, dropless: true, aux_loss_coeff: 0.1, z_loss_coeff: 0.01}",
}
NOISY = {  # Shazeer et al.'s noisy top-2 (the noise of the whole sequence), dropless, its two losses
    "model.mlp_layers": '[[["moe", "dense"], 1]]',
    "model.moe": "{num_experts: 4, router: noisy_topk, top_k: 2, dropless: true, aux_loss_coeff: 1.0}",
}
LAYOUTS = {  # name: model, layout, processes
    "moe_cp2": (MOE, {"parallel.context": 2}, 2),
    "switch_cp2_zigzag": (SWITCH, {"parallel.context": 2, "parallel.context_layout": "zigzag"}, 2),
    "noisy_cp2": (NOISY, {"parallel.context": 2}, 2),
    "moe_cp2_ep2": (MOE, {"parallel.context": 2, "parallel.expert": 2}, 4),  # and DP=2 of the dense weights
    "moe_cp2_pp2": (MOE, {"parallel.context": 2, "parallel.pipeline": 2}, 4),
    "moe_cp2_tp2_ep2": (MOE, {"parallel.context": 2, "parallel.tensor": 2, "parallel.expert": 2}, 4),
}
REFERENCES = {"moe_single": MOE, "switch_single": SWITCH, "noisy_single": NOISY}


def test_moe_training_at_context_2_equals_one_process(tiny_data, tmp_path):
    """Losses, aux losses and the final held-out loss within 2e-5, gradient norms within 1e-4
    relative, the final weights (router biases included) within 1e-4 of one process; the logged
    expert loads are the whole sequence's."""
    for name, model in REFERENCES.items():
        train_here(overrides(tiny_data, tmp_path / name, **model))
    for procs in (2, 4):
        run_driver([overrides(tiny_data, tmp_path / name, **model, **layout)
                    for name, (model, layout, p) in LAYOUTS.items() if p == procs], procs, tmp_path)
    for name, (model, _, _) in LAYOUTS.items():
        single = tmp_path / next(ref for ref, m in REFERENCES.items() if m is model)
        reference = read_metrics(single)
        assert reference[STEPS] < reference[1], name  # it trains
        close_losses(read_metrics(tmp_path / name), reference, range(1, STEPS + 1), name)
        aux, want = read_metrics(tmp_path / name, "train/moe_aux_loss"), read_metrics(single, "train/moe_aux_loss")
        assert want[1] > 1e-3, (name, want[1])  # the aux loss is a real part of the loss
        close_losses(aux, want, range(1, STEPS + 1), name + " aux")
        close_norms(tmp_path / name, single, name)
        same_weights(tmp_path / name, single, name)
        held_out, want = read_metrics(tmp_path / name, "valid/loss"), read_metrics(single, "valid/loss")
        assert held_out.keys() == want.keys() == {STEPS}, name  # the final evaluation's loss too
        close_losses(held_out, want, [STEPS], name + " held-out")
        layer = 2 if model is SWITCH else 1
        for e in range(4):  # the last micro-batch's load of the whole sequence (the same micro-batch at DP=1)
            key = f"moe/layer{layer}/expert{e}_load"
            if "ep2" not in name:
                loads, want_loads = read_metrics(tmp_path / name, key), read_metrics(single, key)
                assert abs(loads[STEPS] - want_loads[STEPS]) < 1e-9, (name, key)


def test_capacity_is_per_chunk_and_aux_loss_is_the_whole_sequences():
    out = run_script("context_moe_driver.py", 2)
    assert "MoE at CP=2: aux loss and gradients equal one process, drops per chunk" in out

