"""The embedded default: everything megalong does, end to end, on any machine, with no network.

corpus (the standard library's own documentation, Pile-format .jsonl.zst) -> SentencePiece
tokenizer -> megatron .bin/.idx -> a tiny GPT trained on the CPU -> held-out perplexity ->
checkpoint -> Hugging Face export -> text sampled from the export with `transformers`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("megalong")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
DEMO_VOCAB = 2048


def unigram_entropy(prefix: str) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of a model that ignores context."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    counts = np.bincount(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def sample_from_export(hf_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=20,
                         temperature=0.8, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def demo_data_paths(workdir: Path) -> tuple[Path, Path, Path]:
    """(corpus .jsonl.zst, tokenizer prefix, .bin/.idx prefix) of the embedded default."""
    return (workdir / "corpus" / "stdlib_docs.jsonl.zst", workdir / "tokenizer" / "spm",
            workdir / "data" / "stdlib_docs")


def demo_data(workdir: Path) -> tuple[Path, Path, Path]:
    """`demo_data_paths`, with the corpus, tokenizer and .bin/.idx prepared under workdir unless a
    previous run left them there."""
    paths = demo_data_paths(workdir)
    if not Path(f"{paths[2]}.idx").is_file():
        prepare_demo_data(workdir)
    return paths


def prepare_demo_data(workdir: Path) -> tuple[str, str]:
    """Steps 1-3 of the demo: (tokenizer model, .bin/.idx prefix) under workdir."""
    from megalong.data.preprocess import PreprocessOptions, preprocess
    from megalong.data.stdlib_corpus import build_stdlib_corpus
    from megalong.data.tokenizer_training import train_sentencepiece

    corpus, tokenizer_prefix, data_prefix = demo_data_paths(workdir)
    log.info("1/6 corpus: Python standard library documentation -> %s", corpus)
    log.info("    %s", build_stdlib_corpus(corpus))
    log.info("2/6 tokenizer: SentencePiece BPE, %d pieces -> %s.model", DEMO_VOCAB, tokenizer_prefix)
    train_sentencepiece([str(corpus)], str(tokenizer_prefix), vocab_size=DEMO_VOCAB, model_type="bpe")
    log.info("3/6 preprocess -> %s.bin/.idx", data_prefix)
    preprocess(PreprocessOptions([str(corpus)], str(data_prefix), f"{tokenizer_prefix}.model", workers=2))
    return f"{tokenizer_prefix}.model", str(data_prefix)


def run_demo(workdir: Path, steps: Optional[int] = None, config: Optional[str] = None,
             overrides: list[str] = ()) -> dict:
    from megalong.config import load_config
    from megalong.export.hf import export_checkpoint
    from megalong.parallel.distributed import shutdown
    from megalong.paths import check_writable_dir
    from megalong.train.loop import train

    started = time.perf_counter()
    check_writable_dir(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = Path(config) if config else DEFAULT_CONFIG
    _, tokenizer_prefix, data_prefix = demo_data_paths(workdir)
    save_dir = workdir / "checkpoints"
    hf_dir = workdir / "hf"

    # Validate the run's config before any work, with the data paths it will have.
    data_overrides = [f"data.tokenizer={tokenizer_prefix}.model", f"data.train=[{data_prefix}]",
                      f"train.save_dir={save_dir}", "train.load=null",
                      "train.overwrite=true", *overrides]  # a demo run again replaces its checkpoints
    if steps is not None:
        data_overrides.append(f"train.train_steps={steps}")
    load_config([config_path], data_overrides, check_paths=False)

    prepare_demo_data(workdir)
    entropy = unigram_entropy(str(data_prefix))
    log.info("    unigram entropy of the corpus: %.3f nats/token (a model must beat this)", entropy)

    log.info("4/6 train (%s)", config_path)
    cfg = load_config([config_path], data_overrides)
    try:
        result = train(cfg)
    finally:
        shutdown()

    log.info("5/6 export %s -> %s", result.checkpoint, hf_dir)
    export_checkpoint(result.checkpoint, hf_dir)
    log.info("6/6 sample from the export with transformers:")
    text = sample_from_export(hf_dir, "The")
    log.info("    %r", text)

    final = result.losses[max(result.losses)]
    summary = {
        "unigram_entropy": entropy,
        "final_train_loss": final,
        "held_out_loss": result.final_valid_loss,
        "held_out_perplexity": math.exp(result.final_valid_loss),
        "sample": text,
        "checkpoint": str(result.checkpoint),
        "hf_dir": str(hf_dir),
        "minutes": (time.perf_counter() - started) / 60,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("done in %.1f min: training loss %.3f, held-out loss %.3f (perplexity %.1f) vs unigram "
             "entropy %.3f", summary["minutes"], final, summary["held_out_loss"],
             summary["held_out_perplexity"], entropy)
    return summary
