"""Config loading, merging and validation: every error names its key."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from megalong.config import (ConfigError, ExecutionConfig, ModelConfig, TrainConfig, architecture_differences,
                             config_from_dict, expand_layer_pattern, load_config, migrate_saved_config,
                             padded_vocab_size, validate)

REPO = Path(__file__).resolve().parents[1]


def _check(raw, world_size=1):
    cfg = config_from_dict(raw)
    validate(cfg, check_paths=False, world_size=world_size)
    return cfg


def test_layer_pattern_expands_like_gpt_neo():
    assert expand_layer_pattern([[["global", "local"], 2]], "k") == ["global", "local"] * 2
    assert expand_layer_pattern(["global", "local"], "k") == ["global", "local"]
    assert expand_layer_pattern([[["global"], 1], [["local"], 2]], "k") == ["global", "local", "local"]


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_layer'.*did you mean 'num_layers'"):
        _check({"model": {"num_layer": 2}})
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        _check({"trian": {}})
    with pytest.raises(ConfigError, match=r"model.attention.local.windw.*did you mean 'window'"):
        _check({"model": {"attention": {"local": {"windw": 3}}}})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="model.hidden_size: expected an integer"):
        _check({"model": {"hidden_size": "big"}})
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        _check({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="model.position_embedding: must be one of"):
        _check({"model": {"position_embedding": "sinusoid"}})
    with pytest.raises(ConfigError, match="model.alibi: expected true or false"):
        _check({"model": {"alibi": "yes"}})


def test_shapes_that_do_not_divide():
    with pytest.raises(ConfigError, match="model.num_attention_heads: 5 heads do not divide model.hidden_size 128"):
        _check({"model": {"num_attention_heads": 5}})
    with pytest.raises(ConfigError, match="parallel.tensor: 3 does not divide model.num_attention_heads 4"):
        _check({"model": {"num_attention_heads": 4, "hidden_size": 96}, "parallel": {"tensor": 3}},
               world_size=3)
    with pytest.raises(ConfigError, match="parallel.tensor: 2 does not divide the 3 processes"):
        _check({"parallel": {"tensor": 2}}, world_size=3)
    with pytest.raises(ConfigError, match="train.global_batch_size: 8 is not a multiple"):
        _check({"train": {"micro_batch_size": 3, "global_batch_size": 8}})
    with pytest.raises(ConfigError, match="model.attention_layers: the pattern expands to 4 layers but model.num_layers is 2"):
        _check({"model": {"attention_layers": [[["global", "local"], 2]]}})
    with pytest.raises(ConfigError, match="unknown attention kind 'lokal'.*did you mean 'local'"):
        _check({"model": {"attention_layers": [[["global", "lokal"], 1]]}})
    with pytest.raises(ConfigError, match="model.alibi: ALiBi replaces position embeddings"):
        _check({"model": {"alibi": True}})
    with pytest.raises(ConfigError, match="data.seq_length: 512 exceeds model.max_position_embeddings 256"):
        _check({"data": {"seq_length": 512}})


def test_missing_data_paths_name_the_key(tmp_path):
    cfg = config_from_dict({"data": {"tokenizer": str(tmp_path / "none.model")}})
    with pytest.raises(ConfigError, match="data.tokenizer: file not found"):
        validate(cfg)
    (tmp_path / "t.model").write_text("x")
    cfg = config_from_dict({"data": {"tokenizer": str(tmp_path / "t.model"),
                                     "train": [{"path": str(tmp_path / "corpus")}]}})
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: .*corpus.bin not found"):
        validate(cfg)
    cfg = config_from_dict({"data": {"tokenizer": str(tmp_path / "t.model")}})
    with pytest.raises(ConfigError, match="data.train: no datasets given"):
        validate(cfg)


def test_files_merge_in_order_and_overrides_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"model": {"hidden_size": 64, "num_layers": 2}, "train": {"lr": 0.1}}))
    b.write_text(yaml.safe_dump({"model": {"hidden_size": 96}}))
    cfg = load_config([a, b], ["train.lr=3e-4", "model.num_attention_heads=6"], check_paths=False)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.lr) == (96, 2, 3e-4)
    assert cfg.model.num_attention_heads == 6


@pytest.mark.parametrize("name,layers,hidden,heads", [
    ("gpt-neo-125m", 12, 768, 12), ("gpt-neo-350m", 24, 1024, 16),
    ("gpt-neo-1.3b", 24, 2048, 16), ("gpt-neo-2.7b", 32, 2560, 20)])
def test_gpt_neo_configs_have_published_shapes(name, layers, hidden, heads):
    cfg = load_config([REPO / "configs" / f"{name}.yaml"], check_paths=False)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (layers, hidden, heads)
    assert cfg.layer_kinds() == ["global", "local"] * (layers // 2)
    assert cfg.attention_options("local").window == 256
    assert cfg.model.position_embedding == "learned" and not cfg.model.scale_attention


def test_tiny_cpu_config_is_valid():
    load_config([REPO / "configs" / "tiny-cpu.yaml"], check_paths=False)


def test_padded_vocab_is_independent_of_small_tp():
    assert padded_vocab_size(50257, 128, 1) == padded_vocab_size(50257, 128, 2) == 50304


def test_data_parallel_keys_are_checked():
    with pytest.raises(ConfigError, match="parallel.ddp_bucket_size: must be a positive number"):
        _check({"parallel": {"ddp_bucket_size": 0}})
    with pytest.raises(ConfigError, match="parallel.distributed_optimizer: configures megatron-core's DDP"):
        _check({"train": {"engine": "deepspeed"}, "parallel": {"distributed_optimizer": True}})
    with pytest.raises(ConfigError, match="unknown config key 'parallel.distributed_optimiser'.*did you mean 'distributed_optimizer'"):
        _check({"parallel": {"distributed_optimiser": True}})


def test_compile_is_refused_with_the_deepspeed_engine():
    with pytest.raises(ConfigError, match="execution.compile: not supported with train.engine: deepspeed"):
        _check({"train": {"engine": "deepspeed"}, "execution": {"compile": True}})
    _check({"execution": {"compile": True}})


# ---- the execution section, moved keys, typed options ------------------------------------------

def test_every_moved_key_is_refused_naming_its_new_place(tmp_path):
    from megalong.config import MOVED_KEYS

    assert len(MOVED_KEYS) == 8
    for (section, key), (new_section, new_key) in MOVED_KEYS.items():
        message = f"^{section}.{key} moved to {new_section}.{new_key}$"
        with pytest.raises(ConfigError, match=message):
            config_from_dict({section: {key: None}})
        with pytest.raises(ConfigError, match=message):
            load_config([], [f"{section}.{key}=1"], check_paths=False)
        _check({new_section: {new_key: getattr(ExecutionConfig(), new_key)}})  # the new place is fine


def test_saved_config_with_old_keys_is_migrated():
    old = {"model": {"num_layers": 2, "kernels": "reference", "loss_chunks": 2, "ffn_chunks": 4,
                     "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
           "train": {"lr": 0.01, "precision": "bf16", "compile": True}}
    migrated = migrate_saved_config(old)
    assert old["model"]["kernels"] == "reference"  # the input is not changed
    assert migrated["model"] == {"num_layers": 2} and migrated["train"] == {"lr": 0.01}
    cfg = _check(migrated)
    assert cfg.execution == ExecutionConfig(kernels="reference", loss_chunks=2, ffn_chunks=4,
                                            recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=1, precision="bf16", compile=True)
    # a value already at the new place wins over the old one
    assert migrate_saved_config({"model": {"kernels": "auto"}, "execution": {"kernels": "reference"}}) == {
        "model": {}, "execution": {"kernels": "reference"}}


def test_model_section_is_architecture_only():
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not model_keys & {f.name for f in dataclasses.fields(ExecutionConfig)}
    assert "precision" not in {f.name for f in dataclasses.fields(TrainConfig)}
    base = _check({})
    changed = _check({"execution": {"kernels": "reference", "loss_chunks": 2, "ffn_chunks": 2, "precision": "bf16",
                                    "compile": True, "recompute_granularity": "selective"}})
    assert architecture_differences(base, changed) == []
    other = _check({"model": {"activation": "swiglu", "qkv_bias": True}})
    assert architecture_differences(base, other) == ["model.activation: checkpoint 'gelu_tanh', config 'swiglu'",
                                                     "model.qkv_bias: checkpoint False, config True"]


def test_attention_and_moe_options_are_typed_once_at_load():
    from megalong.attention.options import LocalOptions, LshOptions
    from megalong.moe.options import MoEOptions

    cfg = _check({"model": {"attention_layers": [[["local", "lsh"], 1]],
                            "attention": {"local": {"window": 8}, "lsh": {"bucket_size": 64}},
                            "moe": {"num_experts": 4, "router": "switch", "top_k": 1}}})
    assert cfg.model.attention["local"] == LocalOptions(window=8) and cfg.attention_options("local") is cfg.model.attention["local"]
    assert isinstance(cfg.model.attention["lsh"], LshOptions)
    assert cfg.model.moe == MoEOptions(num_experts=4, router="switch", top_k=1)
    assert cfg.attention_options("global") == type(cfg.attention_options("global"))()  # defaults when not given
    # the saved form is plain data that loads back to the same objects
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again.model == cfg.model
    with pytest.raises(ConfigError, match=r"model.attention.lokal: unknown attention kind; did you mean 'local'"):
        config_from_dict({"model": {"attention": {"lokal": {}}}})
    with pytest.raises(ConfigError, match=r"model.moe.num_expert'; did you mean 'num_experts'"):
        config_from_dict({"model": {"moe": {"num_expert": 4}}})
    with pytest.raises(ConfigError, match="model.moe.router: must be one of"):
        config_from_dict({"model": {"moe": {"router": "best"}}})


def test_options_reach_the_module_as_the_config_object():
    from megalong.attention.registry import core_attention_spec

    cfg = _check({"model": {"attention_layers": [[["local"], 2]], "attention": {"local": {"window": 8}}}})
    spec = core_attention_spec("local", cfg.attention_options("local"), alibi=False)
    assert spec.params["options"] is cfg.model.attention["local"]


def test_kind_capabilities_come_from_the_options_classes(monkeypatch):
    """Validation reads supports_alibi / supports_rope / dense_mlp_only from the options class, not
    the kind's name: flipping a flag flips the verdict."""
    from megalong.attention.options import FamOptions, LinearOptions

    alibi_linear = {"model": {"attention_layers": [[["linear"], 2]], "alibi": True, "position_embedding": "none"}}
    with pytest.raises(ConfigError, match="model.alibi: 'linear' attention has no attention scores to bias"):
        _check(alibi_linear)
    monkeypatch.setattr(LinearOptions, "supports_alibi", True)
    _check(alibi_linear)

    fam = {"attention_layers": [[["fam"], 2]], "attention": {"fam": {"block_size": 64}}}
    with pytest.raises(ConfigError, match="model.position_embedding: fam layers do not support rope"):
        _check({"model": {**fam, "position_embedding": "rope"}})
    with pytest.raises(ConfigError, match="model.mlp_layers: fam layers need a dense MLP, not moe"):
        _check({"model": {**fam, "mlp_layers": ["dense", "moe"]}})
    monkeypatch.setattr(FamOptions, "supports_rope", True)
    monkeypatch.setattr(FamOptions, "dense_mlp_only", False)
    _check({"model": {**fam, "position_embedding": "rope", "mlp_layers": ["dense", "moe"]}})


def test_derived_values():
    cfg = _check({"model": {"hidden_size": 96, "num_attention_heads": 6, "activation": "swiglu"}})
    assert (cfg.model.head_dim, cfg.model.gated_mlp, cfg.ffn_hidden_size) == (16, True, 384)
    cfg = _check({"model": {"ffn_hidden_size": 100}})
    assert (cfg.model.gated_mlp, cfg.ffn_hidden_size) == (False, 100)


def test_gpt_neo_configs_run_in_bf16():
    for name in ("gpt-neo-125m", "gpt-neo-350m", "gpt-neo-1.3b", "gpt-neo-2.7b"):
        assert load_config([REPO / "configs" / f"{name}.yaml"], check_paths=False).execution.precision == "bf16"
