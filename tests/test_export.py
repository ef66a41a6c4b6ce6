"""Hugging Face export: a plain GPTNeoForCausalLM with megalong's logits and greedy tokens, for
TP=1 and TP=2 (merged) checkpoints; the tokenizer loads with AutoTokenizer; refusals say why."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import run_cli, tiny_overrides
from megalong.config import ExecutionConfig, ModelConfig, load_config
from megalong.data.corpus import iter_documents
from megalong.data.tokenizer import SentencePieceTokenizer
from megalong.export.hf import ExportError, export_checkpoint
from megalong.generate import generate, load_for_inference
from megalong.parallel.distributed import shutdown
from megalong.train.loop import train

STEPS = 6


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Checkpoints of the same GPT-Neo-shaped model trained a few steps with TP=1 and TP=2."""
    root = tmp_path_factory.mktemp("export")
    # 512 tokenizer pieces padded to 576: the padded ids exist and must never be generated.
    extra = {"train.lr": 3e-3, "model.num_layers": 4, "model.attention_layers": '[[["global", "local"], 2]]',
             "model.make_vocab_size_divisible_by": 96}
    args = tiny_overrides(tiny_data, root / "tp1", STEPS, **extra)
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    run_cli(["train", *tiny_overrides(tiny_data, root / "tp2", STEPS, **extra, **{"parallel.tensor": 2})], nproc=2)
    return {"tp1": root / "tp1", "tp2": root / "tp2", "root": root}


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_export_is_plain_gpt_neo_with_equal_logits_and_greedy_tokens(trained, layout):
    from transformers import AutoModelForCausalLM, GPTNeoForCausalLM

    out = export_checkpoint(trained[layout], trained["root"] / f"hf_{layout}")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, GPTNeoForCausalLM)
    assert hf.config.vocab_size == 576 and hf.config.attention_types == [[["global", "local"], 2]]
    assert hf.generation_config.suppress_tokens == list(range(512, 576))  # padded ids never generated
    assert_same_logits_and_greedy_tokens(hf, trained[layout], length=40, prompt="Return the number of")


def assert_same_logits_and_greedy_tokens(hf, checkpoint, length: int, prompt: str, new_tokens: int = 12):
    """megalong's model from `checkpoint` and the exported HF model: fp32 logits within 1e-4 on
    random tokens, and the same greedy continuation of `prompt`."""
    try:
        model, cfg, tokenizer = load_for_inference(checkpoint)
        tokens = torch.randint(0, tokenizer.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(tokens, torch.arange(length).expand(2, length), None)
            theirs = hf(tokens).logits
        assert ours.shape == theirs.shape == (2, length, hf.config.vocab_size)
        assert (ours - theirs).abs().max().item() < 1e-4
        prompt_ids = tokenizer.encode(prompt)
        mine = generate(model, prompt_ids, new_tokens, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)
        with torch.no_grad():
            generated = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                                    use_cache=True)
        assert generated[0, len(prompt_ids):].tolist() == mine
    finally:
        shutdown()


def test_tp2_export_equals_its_unmerged_shards_merged_by_training(trained):
    """Both layouts trained from the same weights on the same data: their exports agree."""
    from safetensors.torch import load_file

    a = load_file(export_checkpoint(trained["tp1"], trained["root"] / "a") / "model.safetensors")
    b = load_file(export_checkpoint(trained["tp2"], trained["root"] / "b") / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_auto_tokenizer_matches_sentencepiece(trained, tiny_data):
    from transformers import AutoTokenizer

    out = export_checkpoint(trained["tp1"], trained["root"] / "tok")
    hf = AutoTokenizer.from_pretrained(out)
    sp = SentencePieceTokenizer(tiny_data.tokenizer)
    texts = list(iter_documents([tiny_data.prefix.replace("docs", "docs.jsonl.zst")]))[:20]
    texts += ["  leading spaces\n\nand newlines 12345 ünïcödé 🎉", "\nfirst", " ", "trailing   ",
              "a literal </s> and <s> or <unk> are text, as in SentencePiece"]
    for text in texts:
        ids = hf(text).input_ids
        assert ids == sp.encode(text)
        assert hf.decode(ids) == text
    assert hf.eos_token_id == sp.eod


GPT_NEO_MISFITS = {
    "model.position_embedding": {"position_embedding": "rope"},
    "model.alibi": {"alibi": True, "position_embedding": "none"},
    "model.normalization": {"normalization": "RMSNorm"},
    "model.activation": {"activation": "gelu"},
    "model.scale_attention": {"scale_attention": True},
    "model.qkv_bias": {"qkv_bias": True},
    "model.linear_bias": {"linear_bias": False},
    "model.tie_embeddings": {"tie_embeddings": False},
    "model.mlp_layers": {"mlp_layers": [[["dense", "moe"], 1]]},
}


@pytest.mark.parametrize("key", sorted(GPT_NEO_MISFITS))
def test_gpt_neo_refusal_names_the_config_key(key):
    from megalong.config import config_from_dict, validate
    from megalong.export.gpt_neo import gpt_neo_refusal

    neo = {"attention_layers": [[["global", "local"], 1]], "scale_attention": False}
    assert gpt_neo_refusal(config_from_dict({"model": neo})) is None
    cfg = config_from_dict({"model": {**neo, **GPT_NEO_MISFITS[key]}})
    validate(cfg, check_paths=False)
    reason = gpt_neo_refusal(cfg)
    assert reason is not None and key in reason


def test_failed_export_leaves_nothing_and_never_replaces_other_folders(trained, monkeypatch):
    import megalong.export.tokenizer

    root = trained["root"]
    out = export_checkpoint(trained["tp1"], root / "again")
    first = (out / "model.safetensors").read_bytes()
    assert export_checkpoint(trained["tp1"], root / "again") == out  # a previous export is replaced
    assert (out / "model.safetensors").read_bytes() == first

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(megalong.export.tokenizer, "export_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained["tp1"], root / "broken")
    assert not (root / "broken").exists()
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained["tp1"], out)
    assert (out / "model.safetensors").read_bytes() == first  # the previous export is kept
    monkeypatch.undo()

    precious = root / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a Hugging Face export"):
        export_checkpoint(trained["tp1"], precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_sampler_never_picks_padding_and_is_reproducible(trained, capsys):
    from megalong.cli import main

    try:
        model, cfg, tokenizer = load_for_inference(trained["tp1"])
        padded = model.embedding.word_embeddings.weight.shape[0]
        assert model.tokenizer_vocab_size == tokenizer.vocab_size < padded
        prompt = tokenizer.encode("Return the")
        greedy = generate(model, prompt, 8)
        assert generate(model, prompt, 8, temperature=1.0, top_k=1, seed=3) == greedy
        sampled = generate(model, prompt, 20, temperature=1.5, seed=7)
        assert generate(model, prompt, 20, temperature=1.5, seed=7) == sampled
        long_prompt = (prompt * 40)[:cfg.model.max_position_embeddings + 5]  # cropped to the window
        assert len(generate(model, long_prompt, 3)) == 3

        class PaddingLover(torch.nn.Module):  # the padded ids get the highest logits
            max_sequence_length = model.max_sequence_length
            tokenizer_vocab_size = model.tokenizer_vocab_size

            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, *args):
                logits = self.inner(*args).clone()
                logits[..., tokenizer.vocab_size:] = 1e4
                return logits

        lover = PaddingLover()
        assert max(generate(lover, prompt, 5)) < tokenizer.vocab_size
        assert max(generate(lover, prompt, 5, temperature=2.0, seed=0)) < tokenizer.vocab_size
        with pytest.raises(ValueError, match="top_k"):
            generate(model, prompt, 1, temperature=1.0, top_k=0)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            generate(model, [padded - 1], 1)
    finally:
        shutdown()
    try:
        assert main(["generate", str(trained["tp1"]), "--prompt", "Return the", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    finally:
        shutdown()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == tokenizer.decode(prompt + greedy[:5])
    assert printed.startswith("Return the")


def test_models_no_format_can_hold_are_refused_with_the_reasons(tiny_data, tmp_path):
    extra = {"model.mlp_layers": '[[["dense", "moe"], 1]]', "model.moe": "{router: expert_choice, num_experts: 4}"}
    args = tiny_overrides(tiny_data, tmp_path / "ckpt", 1, **extra)
    try:
        train(load_config([], [a for a in args if a != "--set"]))
    finally:
        shutdown()
    with pytest.raises(ExportError, match=r"nor GPTNeoForCausalLM \(.*model.mlp_layers has MoE layers.*\), nor "
                                          r"MixtralForCausalLM \(.*model.activation.*\), nor MegalongForCausalLM "
                                          r"\(model.moe.router is 'expert_choice'"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf*"))


# Neither GPT-Neo nor Mixtral: ALiBi, RMSNorm, global/local, an MoE layer with capacity and a shared
# expert; and RoPE with GELU, untied embeddings, trained with TP=2.
MEGALONG_SHAPES = {
    "alibi_moe": {"model.alibi": "true", "model.position_embedding": "none", "model.normalization": "RMSNorm",
                  "model.mlp_layers": '[[["dense", "moe"], 1]]',
                  "model.moe": "{num_experts: 4, top_k: 2, capacity_factor: 1.0, num_shared_experts: 1}"},
    "rope_tp2": {"model.position_embedding": "rope", "model.activation": "gelu", "model.tie_embeddings": "false",
                 "model.scale_attention": "true", "parallel.tensor": 2, "execution.loss_chunks": 2,
                 "execution.kernels": "reference"},
}


@pytest.mark.parametrize("shape", sorted(MEGALONG_SHAPES))
def test_other_models_export_as_megalong_class_with_equal_logits(tiny_data, tmp_path, shape):
    from transformers import AutoModelForCausalLM

    extra = {**MEGALONG_SHAPES[shape], "train.lr": 3e-3}
    nproc = int(extra.get("parallel.tensor", 1))
    run_cli(["train", *tiny_overrides(tiny_data, tmp_path / "ckpt", 4, **extra)], nproc=nproc)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegalongForCausalLM"
    assert_same_logits_and_greedy_tokens(hf, tmp_path / "ckpt", length=30, prompt="Return the", new_tokens=8)
    # config.json holds the architecture only: the model section's keys, no execution key
    exported = json.loads((out / "config.json").read_text())["megalong_model"]
    assert set(exported) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert not set(exported) & {f.name for f in dataclasses.fields(ExecutionConfig)}


def test_export_config_written_before_the_execution_section_still_loads():
    """An exported config.json whose megalong_model still holds kernels/loss_chunks/recompute keys
    (written before they moved to `execution`) gives the same model config without them."""
    from megalong.export.modeling import MegalongConfig

    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "attention_layers": [[["global"], 2]]}
    old = {**model, "kernels": "reference", "loss_chunks": 2, "ffn_chunks": 1,
           "recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    cfg = MegalongConfig(megalong_model=old, vocab_size=128).megalong_config()
    assert cfg.to_dict()["model"] == MegalongConfig(megalong_model=model, vocab_size=128).megalong_config().to_dict()["model"]
    assert (cfg.execution.kernels, cfg.execution.loss_chunks) == ("reference", 2)


MIXTRAL_SHAPE = {
    "model.num_layers": 2,
    "model.attention_layers": '[[["global"], 2]]',
    "model.mlp_layers": '[[["moe"], 2]]',
    "model.moe": "{num_experts: 4, top_k: 2, dropless: true, capacity_factor: null, expert_hidden_size: 96}",
    "model.activation": "swiglu",
    "model.normalization": "RMSNorm",
    "model.position_embedding": "rope",
    "model.scale_attention": "true",
    "model.linear_bias": "false",
    "model.tie_embeddings": "false",
    "train.lr": 3e-3,
}


@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_moe_exports_as_mixtral_with_every_expert(tiny_data, tmp_path, expert_parallel):
    """SwiGLU experts + RMSNorm + RoPE -> a plain MixtralForCausalLM, on Mixtral's on-disk names,
    every expert present and distinct (EP=2 checkpoints gathered), logits and greedy tokens equal."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    save = tmp_path / "ckpt"
    run_cli(["train", *tiny_overrides(tiny_data, save, 4, **MIXTRAL_SHAPE,
                                      **{"parallel.expert": expert_parallel})], nproc=expert_parallel)
    out = export_checkpoint(save, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    for layer in range(2):
        assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in tensors
        experts = [torch.cat([tensors[f"model.layers.{layer}.block_sparse_moe.experts.{j}.{w}.weight"].flatten()
                              for w in ("w1", "w2", "w3")]) for j in range(4)]
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(experts[a], experts[b])  # no expert silently lost or duplicated
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, MixtralForCausalLM)
    assert_same_logits_and_greedy_tokens(hf, save, length=30, prompt="Return the", new_tokens=8)
