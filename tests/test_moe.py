"""MoE: routers against per-token implementations of their papers' formulas, the layer against a
loop over tokens and their experts (float64), and an MoE GPT in the training loop."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megalong.config import ConfigError, config_from_dict, validate
from megalong.moe.layer import MoELayer
from megalong.moe.losses import load_balance_loss
from megalong.moe.options import MoEOptions
from megalong.moe.router import ExpertChoiceRouter, NoisyTopKRouter, TopKRouter, apply_capacity

E, H = 4, 8


def _x(T=12, seed=0):
    return torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _router(cls, **options):
    torch.manual_seed(1)
    r = cls(H, MoEOptions(num_experts=E, router_dtype="fp64", **options)).double()
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return r


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("topk", 3), ("switch", 1)])
def test_topk_and_switch_routers_follow_their_formulas(router, top_k):
    r = _router(TopKRouter, router=router, top_k=top_k, dropless=True, capacity_factor=None,
                aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = _x()
    routing = r(x)
    f = [0.0] * E
    P = [0.0] * E
    z = 0.0
    for t in range(x.shape[0]):
        logits = [float(sum(x[t, d] * r.weight[e, d] for d in range(H))) for e in range(E)]
        m = max(logits)
        exps = [math.exp(l - m) for l in logits]
        probs = [v / sum(exps) for v in exps]
        chosen = sorted(range(E), key=lambda e: -probs[e])[:top_k]
        total = sum(probs[e] for e in chosen)
        gates = [probs[e] / total if router == "topk" else probs[e] for e in chosen]
        assert routing.expert_index[t].tolist() == chosen
        assert torch.allclose(routing.gates[t], torch.tensor(gates, dtype=torch.float64))
        for e in chosen:
            f[e] += 1 / (x.shape[0] * top_k)
        for e in range(E):
            P[e] += probs[e] / x.shape[0]
        z += (m + math.log(sum(exps))) ** 2 / x.shape[0]
    expected = 0.1 * E * sum(fi * pi for fi, pi in zip(f, P)) + 0.01 * z
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-10)


def test_switch_load_balance_loss_is_one_when_routing_is_uniform():
    probs = torch.full((8, E), 1 / E)
    expert_index = torch.arange(8).remainder(E).unsqueeze(1)
    assert load_balance_loss(probs, expert_index, E).item() == pytest.approx(1.0)


def test_noisy_topk_follows_shazeer_2017():
    k = 2
    r = _router(NoisyTopKRouter, router="noisy_topk", top_k=k, dropless=True, capacity_factor=None,
                aux_loss_coeff=1.0)
    x = _x()
    noise = torch.randn(x.shape[0], E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    routing = r(x, noise=noise)
    normal = torch.distributions.Normal(0.0, 1.0)
    importance = [0.0] * E
    load = [0.0] * E
    for t in range(x.shape[0]):
        clean = [float(x[t] @ r.w_gate[e]) for e in range(E)]
        std = [float(F.softplus(x[t] @ r.w_noise[e])) + 1e-2 for e in range(E)]
        h = [clean[e] + float(noise[t, e]) * std[e] for e in range(E)]
        ranked = sorted(range(E), key=lambda e: -h[e])
        chosen = ranked[:k]
        exps = [math.exp(h[e]) for e in chosen]
        gates = [v / sum(exps) for v in exps]
        assert routing.expert_index[t].tolist() == chosen
        assert torch.allclose(routing.gates[t], torch.tensor(gates, dtype=torch.float64))
        for e, g in zip(chosen, gates):
            importance[e] += g
        for e in range(E):
            others = sorted((h[j] for j in range(E) if j != e), reverse=True)
            threshold = others[k - 1]  # the k-th best of the other experts
            load[e] += float(normal.cdf(torch.tensor((clean[e] - threshold) / std[e])))

    def cv2(values):
        v = torch.tensor(values, dtype=torch.float64)
        return (v.var() / v.mean() ** 2).item()

    assert routing.aux_loss.item() == pytest.approx(cv2(importance) + cv2(load), rel=1e-6)


def test_expert_choice_lets_each_expert_pick_its_top_tokens():
    r = _router(ExpertChoiceRouter, router="expert_choice", top_k=2, capacity_factor=1.0)
    x = _x(T=10)
    routing = r(x)
    scores = torch.softmax(x @ r.weight.t(), dim=-1)
    capacity = math.ceil(10 * 2 / E)
    for e in range(E):
        ranked = sorted(range(10), key=lambda t: -float(scores[t, e]))[:capacity]
        assert sorted(torch.nonzero(routing.kept[:, e]).flatten().tolist()) == sorted(ranked)
    assert torch.allclose(routing.gates, scores) and routing.load.tolist() == [capacity] * E


def test_aux_loss_free_bias_steers_choice_not_gates_and_balances():
    r = _router(TopKRouter, router="topk", top_k=1, dropless=True, capacity_factor=None,
                bias_update_rate=0.05, aux_loss_coeff=0.0)
    x = _x(T=64)
    before = r(x)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    r.step_load = None
    r.expert_bias[int(before.expert_index[0, 0])] = -10.0  # forbid the first token's expert
    steered = r(x)
    assert int(steered.expert_index[0, 0]) != int(before.expert_index[0, 0])
    assert torch.allclose(steered.gates[:, 0], probs.gather(1, steered.expert_index)[:, 0])  # gates unbiased
    # The update rule: b_i += rate * sign(mean load - load_i).
    r.expert_bias.zero_()
    r.step_load = torch.tensor([10.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    r.update_bias()
    assert r.expert_bias.tolist() == pytest.approx([-0.05, 0.05, 0.05, 0.05])
    # Repeated steps on a skewed router flatten the load.
    r.expert_bias.zero_()
    with torch.no_grad():
        r.weight[0] += 2.0 * x.mean(0)  # expert 0 wins most tokens
    first = r(x).load.double()
    for _ in range(200):
        r.step_load = None
        r(x)
        r.update_bias()
    last = r(x).load.double()
    assert last.std() < 0.5 * first.std(), (first.tolist(), last.tolist())


def test_capacity_keeps_first_choices_first_then_token_order():
    expert_index = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    kept = apply_capacity(expert_index, 3, capacity=2)
    counts, expected = {}, torch.zeros_like(kept)
    for rank in range(2):
        for t in range(4):
            e = int(expert_index[t, rank])
            counts[e] = counts.get(e, 0) + 1
            expected[t, rank] = counts[e] <= 2
    assert torch.equal(kept, expected)


def _config(num_layers=2, gated=False):
    return SimpleNamespace(hidden_size=H, ffn_hidden_size=16, gated_linear_unit=gated, init_method_std=0.3,
                           num_layers=num_layers, activation_func=lambda v: F.gelu(v, approximate="tanh"))


@pytest.mark.parametrize("options", [
    dict(router="topk", top_k=2, capacity_factor=0.75),                  # drops some assignments
    dict(router="switch", top_k=1, capacity_factor=1.0, num_shared_experts=1),
    dict(router="topk", top_k=2, dropless=True, capacity_factor=None),
    dict(router="expert_choice", top_k=2, capacity_factor=1.0),
])
@pytest.mark.parametrize("gated", [False, True])
def test_moe_layer_equals_a_loop_over_tokens_and_experts(options, gated):
    torch.manual_seed(0)
    layer = MoELayer(_config(gated=gated), options={"num_experts": E, "router_dtype": "fp64", **options}).double()
    for p in layer.router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    hidden = torch.randn(6, 2, H, dtype=torch.float64, requires_grad=True)
    out, bias = layer(hidden)
    assert bias is None
    routing = layer.router(hidden.reshape(-1, H))
    x = hidden.reshape(-1, H)
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(H, dtype=torch.float64)
        for j in range(routing.expert_index.shape[1]):
            if routing.kept[t, j]:
                row = row + routing.gates[t, j] * layer.experts.expert(int(routing.expert_index[t, j]), x[t:t + 1])[0]
        if layer.shared is not None:
            row = row + layer.shared.expert(0, x[t:t + 1])[0]
        rows.append(row)
    reference = torch.stack(rows).view_as(out)
    assert (out - reference).abs().max().item() < 1e-12
    if options.get("capacity_factor") == 0.75:
        assert layer.stats.dropped.item() > 0
    grad = torch.randn_like(out)
    params = [hidden] + list(layer.parameters())
    got = torch.autograd.grad(out, params, grad, allow_unused=True)
    want = torch.autograd.grad(reference, params, grad, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None and b is None) or (a - b).abs().max().item() < 1e-12


def test_one_expert_top1_equals_a_dense_mlp():
    layer = MoELayer(_config(), options={"num_experts": 1, "top_k": 1, "dropless": True,
                                         "capacity_factor": None, "router_dtype": "fp64"}).double()
    x = torch.randn(5, 3, H, dtype=torch.float64)
    dense = F.gelu(x @ layer.experts.w1[0], approximate="tanh") @ layer.experts.w2[0]
    assert (layer(x)[0] - dense).abs().max().item() < 1e-12


@pytest.mark.parametrize("moe,message", [
    ({"num_experts": 4, "top_k": 5}, "model.moe.top_k: 5 must be between 1 and model.moe.num_experts 4"),
    ({"capacity_factor": 0.0}, "model.moe.capacity_factor: must be > 0"),
    ({"router": "switch"}, "model.moe.top_k: the switch router sends each token to one expert"),
    ({"num_expert": 4}, "model.moe.num_expert'; did you mean 'num_experts'"),
    ({"router": "hash"}, "model.moe.router: must be one of"),
])
def test_bad_moe_config_names_the_key(moe, message):
    with pytest.raises(ConfigError, match=message):  # unknown keys and types at load, values in validate
        cfg = config_from_dict({"model": {"mlp_layers": [[["dense", "moe"], 1]], "moe": moe}})
        validate(cfg, check_paths=False)


@pytest.mark.parametrize("parallel,world,message", [
    ({"expert": 3}, 3, "parallel.expert: 3 does not divide model.moe.num_experts 4"),
    ({"expert": 2}, 2, "parallel.expert: 2 needs MoE layers"),
])
def test_bad_expert_parallel_layout_names_the_key(parallel, world, message):
    mlp = [[["dense", "moe"], 1]] if "needs MoE" not in message else None
    cfg = config_from_dict({"model": {"mlp_layers": mlp, "moe": {"num_experts": 4}},
                            "parallel": parallel, "train": {"global_batch_size": 12, "micro_batch_size": 1}})
    with pytest.raises(ConfigError, match=message):
        validate(cfg, check_paths=False, world_size=world)


def test_moe_gpt_trains_and_logs_expert_load(tiny_data, tmp_path):
    from conftest import read_metrics, tiny_overrides
    from megalong.config import load_config
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    extra = {"model.mlp_layers": '[[["dense", "moe"], 1]]',
             "model.moe": "{num_experts: 4, top_k: 2, num_shared_experts: 1}", "train.lr": 3e-3}
    args = tiny_overrides(tiny_data, tmp_path, 20, **extra)
    try:
        result = train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    assert result.losses[20] < result.losses[1] - 1.0
    aux = read_metrics(tmp_path, "train/moe_aux_loss")
    assert len(aux) == 20 and all(0.0 < v < 1.0 for v in aux.values())
    assert read_metrics(tmp_path, "moe/layer2/load_cv") and read_metrics(tmp_path, "moe/layer2/dropped")
    from megalong.checkpoint.step import load_merged_state

    _, state = load_merged_state(tmp_path)
    assert state["decoder.layers.1.mlp.experts.w1"].shape == (4, 64, 256)
