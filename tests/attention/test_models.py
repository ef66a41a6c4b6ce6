"""Models mixing the attention kinds: built from the config (the kinds' own projections and
positions), TP=2 against TP=1 on two gloo processes (weights, loss, gradients), and training
through the CLI."""
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from attention.helpers import model_config, small_model

REPO = Path(__file__).resolve().parents[2]


def test_model_with_axial_positions_and_global_tokens(one_process):
    """Built from the config: axial positions are added to the word embeddings, and a local layer
    with global tokens gets Longformer's global projections, initialised as copies of the local."""
    from megalong.model.gpt import build_model, position_ids_for

    cfg = model_config(num_layers=2, attention_layers=["local", "axial"], position_embedding="axial",
                       axial_position={"shape": [4, 4]},
                       attention={"local": {"window": 3, "global_tokens": 2}, "axial": {"axial_shape": [4, 4]}})
    torch.manual_seed(0)
    model = build_model(cfg, 50)
    attn = model.decoder.layers[0].self_attention
    assert torch.equal(attn.linear_qkv_global.weight, attn.linear_qkv.weight)
    assert not hasattr(model.decoder.layers[1].self_attention, "linear_qkv_global")
    tokens = torch.randint(0, 50, (2, 16))
    loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    loss.backward()
    emb = model.embedding.position_embeddings
    assert emb.row_embeddings.grad.abs().sum() > 0 and emb.col_embeddings.grad.abs().sum() > 0
    assert attn.linear_qkv_global.weight.grad.abs().sum() > 0
    word = model.embedding.word_embeddings(tokens)
    want = (word + emb(position_ids_for(tokens))).transpose(0, 1)
    assert torch.allclose(model.embedding(tokens, position_ids_for(tokens)), want)


def test_lsh_self_attention_projects_no_keys(one_process):
    model = small_model(["lsh", "fam"], {"lsh": {"bucket_size": 4}, "fam": {"block_size": 8, "fam_length": 2}},
                        layers=2)
    names = dict(model.named_parameters())
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 32)  # q and v only
    assert names["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (96, 32)
    assert names["decoder.layers.1.fam_init"].shape == (2, 32)


# ------------------------------------------------------------------------------------------------
# Tensor parallelism (two gloo processes)
# ------------------------------------------------------------------------------------------------

# 12 heads with ALiBi: each TP=2 rank holds 6 heads, whose rotations and slopes must be those of
# global heads 6r..6r+5; the FAM layer's feedback tokens pass row-parallel projections.
TP_MODEL = dict(attention_layers=["lsh", "fam", "global"], seq=16, heads=12, alibi=True, layers=3,
                attention={"lsh": {"bucket_size": 4, "n_hashes": 2, "seed": 3},
                           "fam": {"block_size": 4, "memory_segments": 1, "fam_length": 2}})


def _loss_and_grads(model):
    from megalong.model.gpt import position_ids_for

    tokens = torch.arange(32).view(2, 16) * 7 % 64
    loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _tp_worker(out: str) -> None:
    """Run under torch.distributed.run with 2 processes: TP=2 loss, merged weights and gradients.
    (Run as a script, `conftest` would be tests/attention/conftest.py: this file imports
    tests/conftest.py's helpers only inside the tests that use them.)"""
    import torch.distributed as dist

    from megalong.model.tp_shard import merge_tensor_parallel, partition_dims
    from megalong.parallel.distributed import initialize, shutdown

    initialize(2)
    model = small_model(tensor=2, **TP_MODEL)
    loss, grads = _loss_and_grads(model)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    gathered = [None, None]
    dist.all_gather_object(gathered, (weights, grads))
    if dist.get_rank() == 0:
        dims = partition_dims(model)
        torch.save({"loss": loss, "weights": merge_tensor_parallel([g[0] for g in gathered], dims),
                    "grads": merge_tensor_parallel([g[1] for g in gathered], dims)}, out)
    shutdown()


def test_tensor_parallel_2_equals_1(one_process, tmp_path):
    out = tmp_path / "tp2.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = torch.load(out)
    model = small_model(**TP_MODEL)
    for name, param in model.named_parameters():  # the same seed gives the same model at any TP size
        assert torch.equal(param.detach(), tp2["weights"][name]), name
    loss, grads = _loss_and_grads(model)
    assert abs(loss - tp2["loss"]) < 1e-10
    # Relative bound: megatron's vocab-parallel cross-entropy backward leaves float32 rounding in
    # every gradient (seen: 4e-8 of the largest entry); a wrong head index moves them by percents.
    for name, grad in grads.items():
        assert (grad - tp2["grads"][name]).abs().max().item() <= 1e-6 * grad.abs().max().item(), name


# ------------------------------------------------------------------------------------------------
# Training through the CLI
# ------------------------------------------------------------------------------------------------

MIXED = {
    "model.num_layers": 4,
    "model.attention_layers": '[[["global", "local", "linear", "axial"], 1]]',
    "model.attention": "{local: {window: 8, dilation: [1, 2, 1, 3], global_tokens: [0, 1]}, "
                       "linear: {chunk_size: 16}, axial: {axial_shape: [8, 8]}}",
    "model.position_embedding": "axial",
    "model.axial_position": "{shape: [8, 8], mode: sum}",
    "train.micro_batch_size": 1,
}
STEPS = 4


def test_mixed_kinds_train_and_tp2_matches_one_process(tiny_data, tmp_path):
    from conftest import (  # tests/conftest.py (see _tp_worker)
        read_metrics,
        run_cli,
        tiny_overrides,
    )

    run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "single", STEPS, **MIXED)])
    single = read_metrics(tmp_path / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    assert single[STEPS] < single[1]
    run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "tp2", STEPS, **MIXED, **{"parallel.tensor": 2})],
            nproc=2)
    tp2 = read_metrics(tmp_path / "tp2")
    for step in single:
        assert abs(tp2[step] - single[step]) < 2e-5, (step, tp2[step], single[step])


def test_cli_trains_a_mixed_model(tiny_data, tmp_path):
    """Reformer's [local, lsh] mix and a FAM layer in one model, trained a few steps by the CLI."""
    from conftest import read_metrics, run_cli, tiny_overrides

    run_cli(["train", *tiny_overrides(tiny_data, tmp_path, 3, **{
        "model.attention_layers": '[[["local", "lsh", "fam", "local"], 1]]', "model.num_layers": 4,
        "model.attention": "{local: {window: 8}, lsh: {bucket_size: 8, n_hashes: 2}, "
                           "fam: {block_size: 16, memory_segments: 1, fam_length: 4}}",
        "model.alibi": "true", "model.position_embedding": "none"})])
    losses = read_metrics(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(x) for x in losses.values())
    assert losses[3] < losses[1]


if __name__ == "__main__":
    _tp_worker(sys.argv[1])

