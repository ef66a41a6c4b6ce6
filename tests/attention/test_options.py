"""Attention options in the config (model.attention.<kind>): bad values fail with the key named,
good ones validate; what the options mean to the export's refusals and the FLOP count."""
import pytest

from attention.helpers import model_config
from megalong.config import ConfigError, config_from_dict, validate


@pytest.mark.parametrize("model,message", [
    ({"attention_layers": ["local"], "attention": {"local": {"dilation": [1, 2]}}},
     r"model.attention.local.dilation: a list needs one entry per attention head: got 2 for 4 heads"),
    ({"attention_layers": ["local"], "attention": {"local": {"dilation": 0}}}, r"model.attention.local.dilation"),
    ({"attention_layers": ["local"], "attention": {"local": {"global_tokens": [3, 16]}}},
     r"model.attention.local.global_tokens: positions must be integers in \[0, 16\)"),
    ({"attention_layers": ["local"], "attention": {"local": {"global_tokens": 17}}}, r"model.attention.local.global_tokens"),
    ({"attention_layers": ["local"], "attention": {"local": {"window": 0}}}, r"model.attention.local.window"),
    ({"attention_layers": ["axial"], "attention": {"axial": {"axial_shape": [3, 4]}}},
     r"model.attention.axial.axial_shape: 3 x 4 = 12 is not the sequence length 16"),
    ({"attention_layers": ["axial"]}, r"model.attention.axial.axial_shape: expected \[rows, cols\]"),
    ({"attention_layers": ["linear"], "attention": {"linear": {"normalization": "softmax"}}},
     r"model.attention.linear.normalization: must be one of"),
    ({"attention_layers": ["linear"], "attention": {"linear": {"chunk_size": 0}}}, r"model.attention.linear.chunk_size"),
    ({"attention_layers": ["linear"], "alibi": True, "position_embedding": "none"}, r"model.alibi: 'linear'"),
    ({"position_embedding": "axial"}, r"model.axial_position.shape: expected \[rows, cols\]"),
    ({"position_embedding": "axial", "axial_position": {"shape": [3, 5]}},
     r"model.axial_position.shape: 3 x 5 positions are fewer than the sequence length 16"),
    ({"axial_position": {"shape": [4, 4]}}, r"model.axial_position: set, but model.position_embedding is 'learned'"),
    ({"position_embedding": "axial", "axial_position": {"shape": [4, 4], "mode": "stack"}},
     r"model.axial_position.mode: must be one of"),
])
def test_bad_options_fail_with_the_key_named(model, message):
    with pytest.raises(ConfigError, match=message):
        model_config(**model)


@pytest.mark.parametrize("kind,options,extra,key", [
    ("lsh", {"bucket_size": 5}, {}, "model.attention.lsh.bucket_size"),
    ("lsh", {"bucket_size": 32}, {}, "model.attention.lsh.bucket_size"),  # longer than the sequence
    ("lsh", {"bucket_size": 8}, {}, "model.attention.lsh.bucket_size"),  # 3 buckets: not even
    ("lsh", {"n_hashes": 0, "bucket_size": 4}, {}, "model.attention.lsh.n_hashes"),
    ("lsh", {"bucket_size": 4, "n_buckets": 3}, {}, "model.attention.lsh.n_buckets"),
    ("lsh", {"bucket_size": 4, "n_buckets": 0}, {}, "model.attention.lsh.n_buckets"),
    ("fam", {"block_size": 5}, {}, "model.attention.fam.block_size"),
    ("fam", {"block_size": 8, "memory_segments": 3}, {}, "model.attention.fam.memory_segments"),
    ("fam", {"block_size": 8, "memory_segments": -1}, {}, "model.attention.fam.memory_segments"),
    ("fam", {"block_size": 8, "fam_length": -1}, {}, "model.attention.fam.fam_length"),
    ("fam", {"block_size": 8}, {"position_embedding": "rope"}, "model.position_embedding"),
    ("fam", {"block_size": 8}, {"mlp_layers": ["moe"]}, "model.mlp_layers"),
    ("lsh", {"bukcet_size": 4}, {}, "model.attention.lsh.bukcet_size"),
])
def test_bad_options_name_the_key(kind, options, extra, key):
    with pytest.raises(ConfigError) as err:  # at load (typed options) or at validation
        cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                          "max_position_embeddings": 24, "attention_layers": [kind],
                                          "attention": {kind: options}, **extra}})
        validate(cfg, check_paths=False)
    assert key in str(err.value)


def test_good_options_validate():
    cfg = model_config(num_layers=3, attention_layers=["local", "linear", "axial"], position_embedding="axial",
                       axial_position={"shape": [4, 4], "mode": "concat"},
                       attention={"local": {"window": 4, "dilation": [1, 2, 1, 2], "global_tokens": [0, 8]},
                                  "linear": {"normalization": "efficient"}, "axial": {"axial_shape": [2, 8]}})
    assert cfg.attention_options("local").global_positions() == [0, 8]


def test_lsh_n_buckets_frees_the_chunk_count():
    """3 chunks (odd) are refused by bucket count alone, accepted once n_buckets fixes it."""
    cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "max_position_embeddings": 24, "attention_layers": ["lsh"],
                                      "attention": {"lsh": {"bucket_size": 8, "n_buckets": 4}}}})
    validate(cfg, check_paths=False)
    assert cfg.attention_options("lsh").n_buckets == 4


@pytest.mark.parametrize("local", [{"dilation": 2}, {"dilation": [1, 1, 2, 1]}, {"global_tokens": 1}])
def test_gpt_neo_export_refuses_dilated_or_global_local_layers(local):
    from megalong.export.gpt_neo import gpt_neo_refusal

    plain = dict(num_layers=2, attention_layers=["global", "local"], scale_attention=False, qkv_bias=False)
    assert gpt_neo_refusal(model_config(**plain, attention={"local": {"window": 4}})) is None
    assert "model.attention.local" in gpt_neo_refusal(model_config(**plain, attention={"local": {"window": 4, **local}}))


def test_flop_count_uses_each_kind_s_keys():
    from megalong.model.gpt import attended_keys

    cfg = model_config(num_layers=4, attention_layers=["global", "local", "linear", "axial"],
                       attention={"local": {"window": 4, "global_tokens": 2}, "axial": {"axial_shape": [2, 8]}})
    assert [attended_keys(cfg, k) for k in cfg.layer_kinds()] == [8.5, 6, 8, 8 + 5]
