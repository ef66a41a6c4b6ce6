"""Every attention kind of the registry through megalong's Hugging Face class: cached decoding equals
the full forward; a trained model of each kind exports with megalong's logits and greedy tokens
(with and without the cache, and megalong's own sampler); a mixed TP=2 model exports merged.

New kinds are picked up from ATTENTION_KINDS; a kind without options here runs with its defaults
(and fails at config validation if they do not fit these tiny shapes: add its options below)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_overrides
from megalong.attention.registry import ATTENTION_KINDS
from megalong.config import config_from_dict, load_config, validate
from megalong.export.hf import export_checkpoint
from megalong.generate import generate, load_for_inference
from megalong.parallel.distributed import shutdown
from megalong.train.loop import train

SEQ = 64  # tiny_overrides' max_position_embeddings
# Options that fit SEQ and 4 heads; local's dilation and global tokens are exercised.
KIND_OPTIONS = {
    "local": {"window": 8, "dilation": [1, 2, 1, 3], "global_tokens": [0, 5]},
    "lsh": {"n_hashes": 2, "bucket_size": 8},
    "axial": {"axial_shape": [8, 8]},
    "fam": {"block_size": 16, "memory_segments": 1, "fam_length": 4},
    "linear": {"chunk_size": 16},
}


def _model_dict(layers: list, **extra) -> dict:
    kinds = sorted({k for k in layers})
    return {"num_layers": len(layers), "hidden_size": 32, "num_attention_heads": 4,
            "max_position_embeddings": SEQ, "attention_layers": [[layers, 1]],
            "attention": {k: KIND_OPTIONS[k] for k in kinds if k in KIND_OPTIONS}, **extra}


def _random_hf_model(model: dict):
    from megalong.export.modeling import MegalongConfig, MegalongForCausalLM

    validate(config_from_dict({"model": model}), check_paths=False)
    torch.manual_seed(0)
    hf = MegalongForCausalLM(MegalongConfig(megalong_model=model, vocab_size=50)).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.3)
    return hf


# (kind's layer list, extra model keys): every kind, ALiBi where it composes, local's plain
# window (its key/value cache) and its dilated/global-token form (recomputed), RoPE on global.
DECODE_CASES = {
    **{kind: ([kind, "global"], {}) for kind in ATTENTION_KINDS},
    "local_window_alibi": (["local", "local"], {"alibi": True, "position_embedding": "none",
                                                "attention": {"local": {"window": 5, "dilation": [1, 2, 1, 3]}}}),
    "global_rope": (["global"], {"position_embedding": "rope"}),
    "global_alibi": (["global"], {"alibi": True, "position_embedding": "none"}),
    "axial_alibi": (["axial"], {"alibi": True, "position_embedding": "none"}),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_cached_decoding_equals_the_full_forward(case):
    """Prompt, then tokens one and two at a time through the cache: each step's logits are those of
    the full forward on the context so far (what megalong's sampler computes), in float64: for
    prefix-stable models the forward of the whole sequence; lsh's buckets depend on the length, so
    there each step is checked against the forward of its own context."""
    layers, extra = DECODE_CASES[case]
    hf = _random_hf_model({**_model_dict(layers), **extra})
    prefix_stable = all(layer.prefix_stable for layer in hf.decoder.layers)
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    steps = [(0, 9), (9, 10), (10, 12), *((i, i + 1) for i in range(12, 24))]
    cache, pieces = None, []
    with torch.no_grad():
        for start, stop in steps:
            out = hf(tokens[:, start:stop], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
            if not prefix_stable:
                expected = hf(tokens[:, :stop]).logits[:, start:]
                assert (out.logits - expected).abs().max().item() < 1e-10, (start, stop)
        full = hf(tokens).logits
    assert cache.seen == 24
    if prefix_stable:
        assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-10


def test_local_cache_keeps_only_the_widest_window():
    hf = _random_hf_model(_model_dict(["local"], attention={"local": {"window": 5, "dilation": [1, 2, 1, 3]}}))
    with torch.no_grad():
        cache = hf(torch.randint(0, 50, (1, 30)), use_cache=True).past_key_values
    state = cache.layers[0]
    assert state["k"].shape[2] == 5 * 3 - 1 and state["pos"].tolist() == list(range(16, 30))


def _train(tiny_data, save, layers: list, options: dict, steps: int = 2, tensor: int = 1,
           alibi: bool = False) -> None:
    """A few steps of a tiny model (RMSNorm: never a GPT-Neo export), in this process for TP=1."""
    extra = {"model.num_layers": len(layers), "model.attention_layers": f"[[{layers!r}, 1]]".replace("'", '"'),
             "model.attention": repr(options).replace("'", '"'), "model.normalization": "RMSNorm",
             "train.lr": 3e-3, "parallel.tensor": tensor}
    if alibi:
        extra.update({"model.alibi": "true", "model.position_embedding": "none"})
    args = tiny_overrides(tiny_data, save, steps, **extra)
    if tensor > 1:
        run_cli(["train", *args], nproc=tensor)
        return
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()


def _assert_export_matches(checkpoint, out, prompt: str = "Return the number of", new_tokens: int = 10):
    """Exported MegalongForCausalLM: logits within 1e-4 of megalong's on random tokens; greedy
    generate with the cache, without it, and megalong's sampler give the same tokens."""
    from transformers import AutoModelForCausalLM

    export_checkpoint(checkpoint, out)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegalongForCausalLM"
    try:
        model, cfg, tokenizer = load_for_inference(checkpoint)
        tokens = torch.randint(0, tokenizer.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
            theirs = hf(tokens).logits
        assert (ours - theirs).abs().max().item() < 1e-4
        prompt_ids = tokenizer.encode(prompt)
        mine = generate(model, prompt_ids, new_tokens, vocab_size=tokenizer.vocab_size)
    finally:
        shutdown()
    with torch.no_grad():
        for use_cache in (True, False):
            out_ids = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                                  use_cache=use_cache, eos_token_id=None)
            assert out_ids[0, len(prompt_ids):].tolist() == mine, f"use_cache={use_cache}"


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_every_kind_exports_with_equal_logits_and_greedy_tokens(tiny_data, tmp_path, kind):
    layers = [kind, "global"]
    options = {k: KIND_OPTIONS[k] for k in set(layers) if k in KIND_OPTIONS}
    _train(tiny_data, tmp_path / "ckpt", layers, options)
    _assert_export_matches(tmp_path / "ckpt", tmp_path / "hf")


def test_mixed_model_trained_with_tp2_exports_merged(tiny_data, tmp_path):
    layers = sorted(ATTENTION_KINDS)
    _train(tiny_data, tmp_path / "ckpt", layers, {k: KIND_OPTIONS[k] for k in layers if k in KIND_OPTIONS},
           steps=2, tensor=2)
    _assert_export_matches(tmp_path / "ckpt", tmp_path / "hf")


def test_a_replaced_class_without_counterpart_is_refused_by_name(monkeypatch):
    """A registry entry whose SelfAttention or TransformerLayer class has no Hugging Face
    counterpart is refused at export, naming the layer, the kind and the class."""
    import dataclasses

    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megalong.export.hf import megalong_refusal

    cfg = config_from_dict({"model": _model_dict(["global", "local"])})
    assert megalong_refusal(cfg) is None

    class NewSelfAttention(SelfAttention):
        pass

    class NewLayer(TransformerLayer):
        pass

    entry = ATTENTION_KINDS["local"]
    monkeypatch.setitem(ATTENTION_KINDS, "local", dataclasses.replace(entry, self_attention=NewSelfAttention))
    assert "layer 1 is 'local'" in megalong_refusal(cfg) and "NewSelfAttention" in megalong_refusal(cfg)
    monkeypatch.setitem(ATTENTION_KINDS, "local", dataclasses.replace(entry, layer=NewLayer))
    assert "NewLayer has no Hugging Face counterpart" in megalong_refusal(cfg)


def test_eval_scores_the_same_held_out_tokens_at_any_length(tiny_data, tmp_path, capsys):
    """`megalong eval`: the held-out documents in order, windows of N, every token after a window's
    first scored; lengths past the training length work with ALiBi and are refused for learned
    positions, naming the key."""
    import torch.nn.functional as F

    from megalong.cli import main
    from megalong.data.datasets import split_sizes
    from megalong.evaluate import EvalError, evaluate_checkpoint, held_out_tokens
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _train(tiny_data, tmp_path / "alibi", ["global", "local"], {"local": {"window": 8}}, steps=1,
           alibi=True)
    stream = held_out_tokens(tiny_data.prefix, "90,10,0")
    (train_docs, _), (valid_docs, valid_tokens), _ = split_sizes(tiny_data.prefix, "90,10,0")
    docs = IndexedDataset(tiny_data.prefix)
    expected = np.concatenate([docs[i] for i in range(train_docs, train_docs + valid_docs)])
    assert len(stream) == valid_tokens and (stream == expected).all()

    checkpoint = tmp_path / "alibi"
    short, long = evaluate_checkpoint(checkpoint, [16, 2 * SEQ], max_tokens=256)
    assert long.tokens == 2 * (2 * SEQ - 1) and np.isfinite(long.loss)  # twice the training length
    assert main(["eval", str(checkpoint), "--seq-length", "16", "--tokens", "256"]) == 0
    assert f"seq_length 16: loss {short.loss:.4f}" in capsys.readouterr().out
    try:
        model, _, _ = load_for_inference(checkpoint)
        windows = torch.from_numpy(stream[:256]).view(16, 16)
        with torch.no_grad():
            logits = model(windows, torch.arange(16).expand(16, 16), None)
        by_hand = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()
    finally:
        shutdown()
    assert short.tokens == 16 * 15 and abs(short.loss - by_hand) < 1e-5
    _train(tiny_data, tmp_path / "learned", ["global"], {}, steps=1)
    with pytest.raises(EvalError, match="model.max_position_embeddings"):
        evaluate_checkpoint(tmp_path / "learned", [SEQ + 1])


def test_export_refuses_packed_inputs_by_name():
    """Packed documents (restarting position ids, varlen cu_seq_lens, segment ids) are refused
    with one line, never run with the documents attending to each other; plain positions pass."""
    hf = _random_hf_model(_model_dict(["global"]))
    tokens = torch.randint(0, 50, (2, 8))
    plain = torch.arange(8).expand(2, 8)
    assert hf(tokens, position_ids=plain).logits.shape == (2, 8, 50)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    with pytest.raises(ValueError, match=r"packed sequences \(position_ids\)"):
        hf(tokens, position_ids=packed)
    with pytest.raises(ValueError, match=r"packed sequences \(cu_seq_lens_q\)"):
        hf(tokens, cu_seq_lens_q=torch.tensor([0, 3, 8]))
