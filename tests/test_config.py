"""Config loading, merging and validation: every error names its key."""
from pathlib import Path

import pytest
import yaml

from megalong.config import (ConfigError, config_from_dict, expand_layer_pattern, load_config,
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
