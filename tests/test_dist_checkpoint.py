"""`train.checkpoint_format: megatron` (megalong/checkpoint/dist.py): in one process, exact
resume with dropout (RNG states kept), the step-directory layout, the merged state for export, and
the slicing of gated fc1 weights; in one 4-process gloo job, checkpoints saved at one layout and
loaded at another (TP1 -> TP2 x PP2 -> TP1 x DP4, TP1 -> EP2 x DP2 -> EP1 x PP2 x DP2), weights
and Adam state, against one process."""
from __future__ import annotations

import torch

from conftest import read_metrics, run_driver, tiny_overrides
from megalong.config import load_config
from megalong.parallel.distributed import ParallelLayout, shutdown
from megalong.checkpoint import step as ckpt
from megalong.checkpoint.layout import find_latest
from megalong.train.loop import train


def _run(data, save_dir, **extra):
    args = [a for a in tiny_overrides(data, save_dir, 6, **extra) if a != "--set"]
    try:
        return train(load_config([], args))
    finally:
        shutdown()


def test_megatron_format_resumes_exactly_and_merges(tiny_data, tmp_path):
    extra = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1, "model.activation": "swiglu",
             "train.checkpoint_format": "megatron"}
    straight = _run(tiny_data, tmp_path / "a", **extra)
    _run(tiny_data, tmp_path / "b", **extra, **{"train.stop_at_step": 3})
    step3 = tmp_path / "b" / "step_00000003"
    assert find_latest(tmp_path / "b") == step3 and not list((tmp_path / "b").glob(".*.tmp"))
    assert {p.name for p in step3.iterdir()} == {"config.yaml", "meta.json", "tokenizer.model",
                                                 "rng_rank000.safetensors", "dist"}
    # Resumed from the megatron-format step 3, saving in megalong's own format at the end.
    resumed = _run(tiny_data, tmp_path / "b", **{**extra, "train.checkpoint_format": "megalong"},
                   **{"train.load": "auto"})
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == straight.losses[step], step

    # Same weights, read through either format (megatron's: gated fc1 unfolded to [gate; up]).
    info, merged = ckpt.load_merged_state(tmp_path / "a")
    native_info, native = ckpt.load_merged_state(tmp_path / "b")
    assert (info.meta["format"], native_info.meta["format"]) == ("megatron", "megalong")
    tensors = {k: v for k, v in native.items() if isinstance(v, torch.Tensor)}
    assert merged.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(merged[key], tensor), key
    from megalong.export.hf import export_checkpoint

    export_checkpoint(tmp_path / "a", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _layout(tp: int, tp_rank: int, ep: int = 1, ep_rank: int = 0) -> ParallelLayout:
    return ParallelLayout(world_size=tp * ep, rank=0, tensor_parallel=tp, tensor_rank=tp_rank,
                          data_parallel=1, data_rank=0, device=torch.device("cpu"),
                          expert_parallel=ep, expert_rank=ep_rank)


def _assemble(pieces: list[tuple[torch.Tensor, list]]) -> torch.Tensor:
    """The global tensor from (view, [(axis, rank, fragments)]) pieces, as dist_checkpointing
    places them."""
    view, offsets = pieces[0]
    shape = list(view.shape)
    for axis, _, fragments in offsets:
        shape[axis] *= fragments
    out = torch.full(shape, float("nan"))
    for view, offsets in pieces:
        index = [slice(None)] * view.ndim
        for axis, rank, _ in offsets:
            index[axis] = slice(rank * view.shape[axis], (rank + 1) * view.shape[axis])
        out[tuple(index)] = view
    return out


def test_sharding_places_tp_and_ep_slices_where_the_one_process_model_has_them():
    from megalong.model.tp_shard import split_tensor_parallel
    from megalong.checkpoint.dist import sharding

    full = {"decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, 3),   # gated: [gate; up]
            "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(3, 4),
            "decoder.layers.1.mlp.experts.w1": torch.randn(4, 3, 5)}       # 4 experts
    dims = {"decoder.layers.0.mlp.linear_fc1.weight": 0, "decoder.layers.0.mlp.linear_fc2.weight": 1,
            "decoder.layers.1.mlp.experts.w1": None}
    for tp in (1, 2):
        shards = [split_tensor_parallel(full, dims, tp, r, gated_mlp=True) for r in range(tp)]
        for name in ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"):
            pieces = [sharding(name, shards[r][name], dims, True, _layout(tp, r)) for r in range(tp)]
            expected = full[name].view(2, 4, 3) if "fc1" in name else full[name]
            assert torch.equal(_assemble(pieces), expected), (tp, name)
    name = "decoder.layers.1.mlp.experts.w1"
    pieces = [sharding(name, full[name].chunk(2)[e], dims, True, _layout(2, 0, ep=2, ep_rank=e))
              for e in range(2)]
    assert [o for _, o in pieces] == [[(0, 0, 2)], [(0, 1, 2)]]
    assert torch.equal(_assemble(pieces), full[name])


# Four layers, two of them top-2 MoE layers with a shared expert, SwiGLU (gated fc1 slices over
# TP ranks); one sample per micro-batch, so that MoE capacity sees the same tokens in every layout.
MOE_MODEL = {
    "model.num_layers": 4,
    "model.attention_layers": '[[["global", "local"], 2]]',
    "model.mlp_layers": '[[["dense", "moe"], 2]]',
    "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.5, num_shared_experts: 1, aux_loss_coeff: 0.1}",
    "model.activation": "swiglu",
    "train.micro_batch_size": 1,
    "train.checkpoint_format": "megatron",
}
STEPS = 5
# As tests/test_pipeline.py: float32 reductions in another order across processes; weights and
# Adam's moments get a wider bound since Adam's 1/sqrt(v) magnifies rounding in tiny gradients.
LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4
MOMENT_RTOL = 1e-4  # of the tensor's largest magnitude


def _moe_args(data, save_dir, **extra) -> list[str]:
    return [a for a in tiny_overrides(data, save_dir, STEPS, **MOE_MODEL, **extra) if a != "--set"]


def _merged(step_dir, optimizer: bool = False) -> dict[str, torch.Tensor]:
    from megalong.checkpoint.dist import DIST_DIR, load_merged

    info = ckpt.read_checkpoint_info(step_dir)
    assert info.meta["format"] == "megatron"
    return load_merged(info.path / DIST_DIR, info.meta["partition_dims"], optimizer=optimizer)


def test_megatron_format_reshards_weights_and_adam_state_across_processes(tiny_data, tmp_path):
    single = tmp_path / "single"
    try:
        train(load_config([], _moe_args(tiny_data, single, **{"train.save_interval": 2})))  # steps 2, 4, 5
    finally:
        shutdown()
    reference = read_metrics(single)
    assert reference[STEPS] < reference[1]  # it trains
    step2 = str(single / "step_00000002")
    tp2_pp2 = {"parallel.tensor": 2, "parallel.pipeline": 2}
    runs = {  # name: (overrides, the steps it trains)
        # one process -> TP2 x PP2, saving step 4; -> TP1 x PP1 (DP4, distributed optimizer)
        "tp2_pp2": ({**tp2_pp2, "train.load": step2, "train.stop_at_step": 4}, [3, 4]),
        "tp1": ({"train.load": str(tmp_path / "tp2_pp2" / "step_00000004"),
                 "parallel.distributed_optimizer": "true"}, [5]),
        # one process -> EP2 (DP2), saving step 4; -> EP1 x PP2 (DP2)
        "ep2": ({"parallel.expert": 2, "train.load": step2, "train.stop_at_step": 4}, [3, 4]),
        "ep1_pp2": ({"parallel.pipeline": 2, "train.load": str(tmp_path / "ep2" / "step_00000004")}, [5]),
    }
    run_driver([_moe_args(tiny_data, tmp_path / name, **extra) for name, (extra, _) in runs.items()], 4, tmp_path)

    for name, (_, steps) in runs.items():
        losses = read_metrics(tmp_path / name)
        assert sorted(losses) == steps, (name, sorted(losses))
        for step in steps:
            assert abs(losses[step] - reference[step]) < LOSS_TOL, (name, step, losses[step], reference[step])

    # The step-5 weights and Adam state of either chain are the one-process run's: the state
    # loaded at step 4 made that step's update (a fresh Adam's would differ by far more).
    weights = _merged(single / "step_00000005")
    adam = _merged(single / "step_00000005", optimizer=True)
    assert any("experts" in k for k in adam) and any("linear_fc1" in k for k in adam)
    assert all(v.item() == STEPS for k, v in adam.items() if k.endswith(".step"))
    for name in ("tp1", "ep1_pp2"):
        final = tmp_path / name / "step_00000005"
        merged, merged_adam = _merged(final), _merged(final, optimizer=True)
        assert merged.keys() == weights.keys() and merged_adam.keys() == adam.keys(), name
        for key, tensor in weights.items():
            assert (merged[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)
        for key, tensor in adam.items():
            error = (merged_adam[key] - tensor).abs().max().item()
            assert error <= MOMENT_RTOL * tensor.abs().max().item(), (name, key, error)
