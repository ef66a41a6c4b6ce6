"""`megalong import`: tiny random Hugging Face models of every importable architecture, built here
with transformers (no download), imported and compared with transformers' logits (fp32, 1e-5) at
TP=1 and after loading the imported checkpoint at TP=2 and PP=2 (one 2-process gloo job for
every case); exporting the import gives back the same tensors; what cannot be imported exactly is
refused naming the key, file or tensor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port
from megalong.hf_import.folder import HFImportError
from megalong.hf_import.write import CONFIG_NAME, import_hf
from megalong.parallel.distributed import shutdown

VOCAB, LENGTH = 576, 40
FAMILIES = ("gpt_neo", "llama", "mistral", "qwen2", "mixtral")


def hf_model(family: str, **extra):
    """A tiny random model; norms and biases random too, so that a mix-up shows in the logits."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    configs = {
        "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4,
                                           attention_types=[[["global", "local"], 2]], window_size=8,
                                           max_position_embeddings=64, **extra),
        "llama": lambda: tf.LlamaConfig(**{**common, "rope_theta": 500000.0, **extra}),
        # grouped-query attention: 2 key/value heads for 4 query heads
        "mistral": lambda: tf.MistralConfig(**{**common, "sliding_window": 8, "num_key_value_heads": 2, **extra}),
        "qwen2": lambda: tf.Qwen2Config(**{**common, "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 8,
                                           "max_window_layers": 2, **extra}),
        "mixtral": lambda: tf.MixtralConfig(**{**common, "num_local_experts": 4, "num_experts_per_tok": 2,
                                               **extra}),
    }
    classes = {"gpt_neo": tf.GPTNeoForCausalLM, "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
               "qwen2": tf.Qwen2ForCausalLM, "mixtral": tf.MixtralForCausalLM}
    torch.manual_seed(FAMILIES.index(family) if family in FAMILIES else 0)
    model = classes[family](configs[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.normal_()
    return model


def save_hf(model, folder, tokenizer: str):
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return folder


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def imported(tiny_data, tmp_path_factory):
    """{family: (hf model, hf folder, imported step dir)}."""
    root = tmp_path_factory.mktemp("import")
    out = {}
    try:
        for family in FAMILIES:
            model = hf_model(family)
            folder = save_hf(model, root / f"hf_{family}", tiny_data.tokenizer)
            out[family] = (model, folder, import_hf(folder, root / f"ml_{family}"))
            shutdown()
    finally:
        shutdown()
    return out


def megalong_logits(step_dir, ids: torch.Tensor) -> torch.Tensor:
    from megalong.generate import load_for_inference

    try:
        model, _, _ = load_for_inference(step_dir)
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    finally:
        shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(imported, family):
    hf, _, step_dir = imported[family]
    ids = tokens()
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = megalong_logits(step_dir, ids)
    assert ours.shape == theirs.shape == (2, LENGTH, VOCAB)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_imported_config_and_files(imported):
    import yaml

    _, _, step_dir = imported["qwen2"]
    save_dir = step_dir.parent
    assert step_dir.name == "step_00000000" and (save_dir / "latest").read_text().strip() == step_dir.name
    editable = yaml.safe_load((save_dir / CONFIG_NAME).read_text())
    m = editable["model"]
    # Qwen2: the first max_window_layers layers are full attention, the rest sliding.
    assert m["attention_layers"] == [[["global", "global", "local", "local"], 1]]
    assert m["attention"]["local"]["window"] == 8 and m["qkv_bias"] and not m["linear_bias"]
    assert m["normalization"] == "RMSNorm" and m["activation"] == "swiglu" and m["position_embedding"] == "rope"
    assert m["num_query_groups"] == 2 and m["num_attention_heads"] == 4
    assert editable["train"]["load"] == str(step_dir) and editable["data"]["tokenizer"] == str(save_dir / "tokenizer.model")
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == 0 and meta["format"] == "megalong"
    assert yaml.safe_load((imported["llama"][2] / "config.yaml").read_text())["model"]["rotary_base"] == 500000


def test_imported_checkpoints_load_at_tp2_and_pp2(imported, tmp_path):
    """Every family at TP=2 and at PP=2, in one job of two gloo processes."""
    from safetensors.torch import load_file, save_file

    save_file({"tokens": tokens()}, str(tmp_path / "tokens.safetensors"))
    cases = [{"checkpoint": str(imported[f][2]), "tensor": tp, "pipeline": pp,
              "tokens": str(tmp_path / "tokens.safetensors"), "out": str(tmp_path / f"{f}_tp{tp}_pp{pp}.safetensors")}
             for f in FAMILIES for tp, pp in ((2, 1), (1, 2))]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "import_driver.py"), str(tmp_path / "cases.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    for case in cases:
        family = next(f for f in FAMILIES if str(imported[f][2]) == case["checkpoint"])
        with torch.no_grad():
            theirs = imported[family][0](tokens()).logits
        ours = load_file(case["out"])["logits"]
        assert ours.shape == theirs.shape, case
        assert (ours - theirs).abs().max().item() < 1e-5, case


# ---- refusals ------------------------------------------------------------------------------------

def _edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.fixture()
def llama_folder(tiny_data, tmp_path):
    return save_hf(hf_model("llama"), tmp_path / "hf", tiny_data.tokenizer)


@pytest.mark.parametrize("changes, named", [
    ({"architectures": ["BertForMaskedLM"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unmappable_config_is_refused_naming_the_key(llama_folder, tmp_path, changes, named):
    _edit_config(llama_folder, **changes)
    with pytest.raises(HFImportError, match=named):
        import_hf(llama_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused_and_never_read(llama_folder, tmp_path):
    (llama_folder / "model.safetensors").unlink()
    (llama_folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFImportError, match="pytorch_model.bin: pickled weights"):
        import_hf(llama_folder, tmp_path / "out")


def test_unknown_tensor_and_missing_tensor_are_named(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llama_folder / "model.safetensors"))
    save_file({**tensors, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, str(llama_folder / "model.safetensors"))
    with pytest.raises(HFImportError, match="'model.layers.0.self_attn.extra.weight'.*no megalong counterpart"):
        import_hf(llama_folder, tmp_path / "out")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(llama_folder / "model.safetensors"))
    with pytest.raises(HFImportError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        import_hf(llama_folder, tmp_path / "out")


def test_sharded_index_and_missing_tokenizer(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llama_folder / "model.safetensors"))
    (llama_folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(llama_folder / file))
    (llama_folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    (llama_folder / "tokenizer.model").rename(tmp_path / "spm.model")
    with pytest.raises(HFImportError, match="tokenizer.model: missing"):
        import_hf(llama_folder, tmp_path / "out")
    try:
        step_dir = import_hf(llama_folder, tmp_path / "out", tokenizer=str(tmp_path / "spm.model"))
    finally:
        shutdown()
    from megalong.checkpoint.step import load_merged_state

    _, state = load_merged_state(step_dir)
    assert torch.equal(state["embedding.word_embeddings.weight"], tensors["model.embed_tokens.weight"])


def test_cli_import_error_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    proc = subprocess.run([sys.executable, "-m", "megalong.cli", "import", str(tmp_path / "hf"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megalong: import error: {tmp_path / 'hf' / 'config.json'}: architectures = ['T5ForConditionalGeneration']: "
        "megalong imports GPTNeoForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "MixtralForCausalLM, MegalongForCausalLM"]


# ---- export targets ------------------------------------------------------------------------------

STOCK = {"gpt_neo": "GPTNeoForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}


def assert_export_equals_megalong(out, step_dir, class_name: str, new_tokens: int = 10):
    """The export loads as `class_name`; its logits are megalong's within 1e-5 and greedy
    generation gives megalong's own sampler's tokens."""
    from transformers import AutoModelForCausalLM

    from megalong.generate import generate, load_for_inference

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == class_name
    ids = tokens()
    try:
        model, _, tokenizer = load_for_inference(step_dir)
        with torch.no_grad():
            ours = model(ids, torch.arange(LENGTH).expand_as(ids), None)
            theirs = hf(ids).logits
        assert (ours - theirs).abs().max().item() < 1e-5
        prompt = ids[0, :7].clamp(max=tokenizer.vocab_size - 1).tolist()
        mine = generate(model, prompt, new_tokens, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)
    finally:
        shutdown()
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    assert generated[0, len(prompt):].tolist() == mine


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_the_import_is_the_same_stock_class_with_identical_tensors(imported, family, tmp_path, caplog):
    import logging

    from safetensors.torch import load_file

    from megalong.export.hf import export_checkpoint

    _, folder, step_dir = imported[family]
    with caplog.at_level(logging.INFO, logger="megalong"):
        out = export_checkpoint(step_dir, tmp_path / "hf")
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original), family
    assert json.loads((out / "config.json").read_text())["architectures"] == [STOCK[family]]
    assert_export_equals_megalong(out, step_dir, STOCK[family])
    if family == "qwen2":  # auto says why the plainer classes do not fit
        assert "not as LlamaForCausalLM (model.attention_layers uses ['local']" in caplog.text
        assert "nor MistralForCausalLM (model.attention_layers uses ['global']" in caplog.text


@pytest.mark.parametrize("family, target", [("llama", "qwen2"), ("mistral", "qwen2"), ("llama", "megalong"),
                                            ("mistral", "megalong"), ("mixtral", "megalong")])
def test_every_target_that_fits_gives_megalong_logits_and_greedy_tokens(imported, family, target, tmp_path):
    from megalong.export.hf import export_checkpoint
    from megalong.export.targets import CLASS_NAMES

    step_dir = imported[family][2]
    out = export_checkpoint(step_dir, tmp_path / "hf", target=target)
    assert_export_equals_megalong(out, step_dir, CLASS_NAMES[target])


def test_a_target_that_does_not_fit_is_refused_naming_the_key(imported, tmp_path):
    from megalong.export.hf import ExportError, export_checkpoint

    with pytest.raises(ExportError, match=r"not as MistralForCausalLM \(model.attention_layers uses \['global'\]"):
        export_checkpoint(imported["llama"][2], tmp_path / "hf", target="mistral")
    with pytest.raises(ExportError, match=r"not as LlamaForCausalLM \(.*model.qkv_bias differs"):
        export_checkpoint(imported["qwen2"][2], tmp_path / "hf", target="llama")
    assert not (tmp_path / "hf").exists()


def test_megalong_class_export_imports_back_to_the_same_checkpoint(imported, tmp_path):
    from megalong.checkpoint.step import load_merged_state
    from megalong.export.hf import export_checkpoint

    step_dir = imported["mistral"][2]
    out = export_checkpoint(step_dir, tmp_path / "hf", target="megalong")
    try:
        again = import_hf(out, tmp_path / "again")
    finally:
        shutdown()
    (_, a), (_, b) = load_merged_state(step_dir), load_merged_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_continue_pretraining_recipe_import_train_export(imported, tiny_data, tmp_path):
    """README's recipe: the imported megalong.yaml plus data trains from the imported weights at
    step 0 (its first loss is the imported model's), and the result exports as the stock class."""
    from megalong.config import load_config
    from megalong.export.hf import export_checkpoint
    from megalong.train.loop import train

    save_dir = imported["llama"][2].parent
    overrides = [f"data.train=[{tiny_data.prefix}]", "data.split=90,10,0", "data.seq_length=32",
                 f"train.save_dir={tmp_path / 'run'}", "train.train_steps=2", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "train.warmup_steps=1", "train.progress_bar=false",
                 "train.log_interval=1", "train.eval_interval=1000"]
    try:
        result = train(load_config([save_dir / CONFIG_NAME], overrides))
    finally:
        shutdown()
    from megalong.checkpoint.step import load_merged_state

    assert sorted(result.losses) == [1, 2]
    (_, before), (_, after) = load_merged_state(imported["llama"][2]), load_merged_state(tmp_path / "run")
    # Two Adam steps at lr 1e-3 move a weight by at most ~2e-3: the run started from the import
    # (a fresh initialisation would differ by the weights' whole spread, std 0.02).
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 5e-3
    assert any(not torch.equal(before[k], after[k]) for k in before)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
