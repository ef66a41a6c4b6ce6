"""MegalongForCausalLM.generate called the way transformers users call it: the tokenizer's output
passed whole (attention_mask included), batched prompts, seeded sampling; no deprecation warning
from the cache API; padded batches refused with a clear error. A tiny random Llama imported
(`megalong import`) and exported both as MegalongForCausalLM and as a stock LlamaForCausalLM: two
independent implementations that must sample the same tokens from the same seed."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from megalong.parallel.distributed import shutdown
from test_import import hf_model, save_hf


@pytest.fixture(scope="module")
def exports(tiny_data, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megalong.export.hf import export_checkpoint
    from megalong.hf_import.write import import_hf

    root = tmp_path_factory.mktemp("hf_generate")
    try:
        step_dir = import_hf(save_hf(hf_model("llama"), root / "hf", tiny_data.tokenizer), root / "ml")
    finally:
        shutdown()
    ours = export_checkpoint(step_dir, root / "megalong", target="megalong")
    stock = export_checkpoint(step_dir, root / "llama", target="llama")
    return {"megalong": AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True).eval(),
            "llama": AutoModelForCausalLM.from_pretrained(stock).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(ours), "step_dir": step_dir}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_generate_with_the_tokenizer_output_passed_whole(exports):
    import transformers

    from megalong.generate import generate, load_for_inference

    hf, tokenizer = exports["megalong"], exports["tokenizer"]
    transformers.utils.logging.warning_once.cache_clear()  # a warning given earlier shows again
    messages = _Messages()
    transformers_logger = transformers.utils.logging.get_logger("transformers")
    transformers_logger.addHandler(messages)
    inputs = tokenizer("Return the number of", return_tensors="pt")
    assert set(inputs) >= {"input_ids", "attention_mask"}
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            whole = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
    finally:
        transformers_logger.removeHandler(messages)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [line for line in messages.lines if "deprecated" in line], messages.lines
    try:
        model, _, sp = load_for_inference(exports["step_dir"])
        prompt = inputs["input_ids"][0].tolist()
        mine = generate(model, prompt, 10, eod=sp.eod, vocab_size=sp.vocab_size)
    finally:
        shutdown()
    assert whole[0, len(prompt):].tolist() == mine
    with torch.no_grad():  # the cache really is used: without it, the same tokens
        assert torch.equal(hf.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=False), whole)


def test_batched_prompts_equal_one_at_a_time_and_padding_is_refused(exports):
    hf, tokenizer = exports["megalong"], exports["tokenizer"]
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        for row in range(3):
            alone = hf.generate(input_ids=ids[row:row + 1], max_new_tokens=8, do_sample=False)
            assert torch.equal(batched[row:row + 1, :alone.shape[1]], alone)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    padded = tokenizer(["Return the number of", "Return"], return_tensors="pt", padding=True)
    assert not bool(padded["attention_mask"].all())
    with pytest.raises(ValueError, match="padded batches .* are not supported; generate each prompt on its own"):
        hf.generate(**padded, max_new_tokens=4)


def test_seeded_sampling_equals_the_stock_llama_and_the_uncached_run(exports):
    tokenizer = exports["tokenizer"]
    inputs = tokenizer("Return the number of", return_tensors="pt")
    n = len(inputs["input_ids"][0])

    def sample(name: str, seed: int, **extra) -> list[int]:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = exports[name].generate(**inputs, max_new_tokens=16, do_sample=True, top_k=50, temperature=0.9,
                                         **extra)
        return out[0, n:].tolist()

    ours = sample("megalong", 7)
    assert ours == sample("llama", 7)  # transformers' own Llama draws the same tokens
    assert ours == sample("megalong", 7, use_cache=False)
    assert ours != sample("megalong", 8)
    with torch.no_grad():
        greedy = exports["megalong"].generate(**inputs, max_new_tokens=16, do_sample=False)[0, n:].tolist()
    assert ours != greedy and len(set(ours)) > 4  # sampling, not one repeated token
