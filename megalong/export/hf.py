"""`megalong export CHECKPOINT OUT_DIR`: a Hugging Face folder that transformers loads as is."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megalong.train.checkpoint import load_merged_state

log = logging.getLogger("megalong")


class ExportError(ValueError):
    """A checkpoint that cannot be expressed in the requested Hugging Face format."""


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Merge TP shards, map to GPTNeoForCausalLM, write config, safetensors and tokenizer.

    Written into a temporary folder beside OUT_DIR and renamed when complete."""
    from transformers import GPTNeoForCausalLM

    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.export.gpt_neo import gpt_neo_refusal, to_gpt_neo
    from megalong.export.tokenizer import export_tokenizer

    info, state = load_merged_state(checkpoint)
    reason = gpt_neo_refusal(info.config)
    if reason:
        raise ExportError(f"{info.path} cannot be exported as GPTNeoForCausalLM: {reason}")
    tokenizer_model = info.path / "tokenizer.model"
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    hf_config, tensors = to_gpt_neo(info.config, state, tokenizer.bos, tokenizer.eod)

    model = GPTNeoForCausalLM(hf_config)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to wte
    if missing or result.unexpected_keys:
        raise ExportError(f"weight mapping incomplete: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    # The vocabulary is padded for tensor parallelism; the padded ids are never real tokens.
    padded = list(range(tokenizer.vocab_size, hf_config.vocab_size))
    model.generation_config.eos_token_id = tokenizer.eod
    model.generation_config.pad_token_id = tokenizer.eod
    model.generation_config.suppress_tokens = padded or None

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    export_tokenizer(tokenizer_model, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    log.info("exported %s (step %d, TP=%d merged) -> %s as GPTNeoForCausalLM", info.path,
             info.meta["step"], info.meta["tensor_parallel"], out)
    return out


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step_* directory, or a save_dir (its newest checkpoint)")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")


def run_export(args: argparse.Namespace) -> Optional[int]:
    export_checkpoint(args.checkpoint, args.out_dir)
    return 0
