"""Model assembly from the config: the per-layer spec, GPT-Neo details, schedule, precision."""
import math

import pytest
import torch

from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention
from megalong.config import config_from_dict, validate
from megalong.model.gpt import build_model, position_ids_for
from megalong.parallel.distributed import initialize, shutdown
from megalong.train.schedule import learning_rate


@pytest.fixture
def one_process():
    initialize(1)
    yield
    shutdown()


def _cfg(**model):
    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                      "max_position_embeddings": 16, **model}})
    validate(cfg, check_paths=False)
    return cfg


def test_layers_follow_the_pattern_and_gpt_neo_details(one_process):
    cfg = _cfg(attention_layers=[[["global", "local"], 1]], attention={"local": {"window": 5}},
               scale_attention=False)
    model = build_model(cfg, 100)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert [type(c) for c in cores] == [GlobalAttention, LocalAttention]
    assert cores[1].window == 5 and cores[0].scale == 1.0  # GPT-Neo: no 1/sqrt(d)
    names = dict(model.named_parameters())
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in names  # bias-free q/k/v ...
    assert "decoder.layers.0.self_attention.linear_proj.bias" in names      # ... biased output
    assert "output_layer.weight" not in names                                # tied embeddings
    assert model.embedding.word_embeddings.weight.shape[0] == 128            # padded vocabulary
    x = torch.randn(10)
    assert torch.equal(model.config.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("position", ["learned", "rope", "none"])
def test_position_embeddings_train(one_process, position):
    cfg = _cfg(position_embedding=position, num_layers=1, attention_layers=[[["global"], 1]])
    torch.manual_seed(0)
    model = build_model(cfg, 50)
    tokens = torch.randint(0, 50, (2, 16))
    loss = model(tokens, position_ids_for(tokens), None, labels=tokens).mean()
    loss.backward()
    assert math.isfinite(loss.item())
    has_table = any("position_embeddings" in n for n, _ in model.named_parameters())
    assert has_table == (position == "learned")
    # Without positions, one causal attention layer cannot tell the order of the earlier tokens:
    # permuting them leaves the last output unchanged. With learned or rotary positions it changes.
    first = torch.arange(16).unsqueeze(0)
    permuted = torch.cat([first[:, :15].flip(1), first[:, 15:]], dim=1)
    last = [model(t, position_ids_for(t), None)[0, -1] for t in (first, permuted)]
    assert torch.allclose(last[0], last[1], atol=1e-5) == (position == "none")


def test_bf16_autocast_runs_on_cpu(one_process):
    model = build_model(_cfg(), 50)
    tokens = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens, position_ids_for(tokens), None)
    assert logits.dtype == torch.bfloat16


def test_schedule_warmup_then_cosine_to_min_lr():
    t = config_from_dict({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "train_steps": 110}}).train
    assert learning_rate(0, t) == pytest.approx(0.1)
    assert learning_rate(9, t) == pytest.approx(1.0)
    assert learning_rate(60, t) == pytest.approx(0.55)  # halfway through the cosine
    assert learning_rate(110, t) == pytest.approx(0.1)
    assert learning_rate(500, t) == pytest.approx(0.1)
