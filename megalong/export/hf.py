"""`megalong export CHECKPOINT OUT_DIR`: a Hugging Face folder that transformers loads as is,
as GPTNeoForCausalLM or MixtralForCausalLM when the model is one, else as megalong's own
MegalongForCausalLM (transformers' Auto classes with trust_remote_code=True, megalong installed)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megalong.errors import MegalongError
from megalong.paths import check_writable_dir
from megalong.train.checkpoint import read_checkpoint_info, whole_model_state
from megalong.train.checkpoint_files import TOKENIZER, checkpoint_tokenizer

log = logging.getLogger("megalong")


class ExportError(MegalongError):
    """A checkpoint that cannot be expressed in the requested Hugging Face format."""

    kind = "export"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Merge TP shards and gather EP experts, map to GPTNeoForCausalLM or MixtralForCausalLM
    (whichever the model is), write config, safetensors, generation config and tokenizer.

    Written into a temporary folder beside OUT_DIR and renamed when complete: a refused or failed
    export leaves nothing behind. An existing OUT_DIR is replaced only if it is a previous export."""
    from megalong.export.gpt_neo import gpt_neo_refusal
    from megalong.export.mixtral import mixtral_refusal
    from megalong.export.tokenizer import export_tokenizer

    out = Path(out_dir).resolve()
    _check_replaceable(out)  # before the checkpoint is read: a bad OUT_DIR costs nothing
    if not out.exists():
        check_writable_dir(out, "out_dir")
    check_writable_dir(out.parent, "out_dir")
    info = read_checkpoint_info(checkpoint)
    tokenizer_model = info.path / TOKENIZER
    tokenizer = checkpoint_tokenizer(info.path)
    not_neo, not_mixtral = gpt_neo_refusal(info.config), mixtral_refusal(info.config)
    not_megalong = megalong_refusal(info.config)
    if not_neo and not_mixtral and not_megalong:
        raise ExportError(f"{info.path} cannot be exported: not as GPTNeoForCausalLM ({not_neo}), "
                          f"nor MixtralForCausalLM ({not_mixtral}), nor MegalongForCausalLM ({not_megalong})")

    state = whole_model_state(info)  # every file read and checked before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if not_neo is None:
            kind, vocab = "GPTNeoForCausalLM", _write_gpt_neo(info.config, state, tokenizer, tmp)
        elif not_mixtral is None:
            kind, vocab = "MixtralForCausalLM", _write_mixtral(info.config, state, tokenizer, tmp)
        else:
            kind, vocab = "MegalongForCausalLM", _write_megalong(info.config, state, tokenizer, tmp)
        _generation_config(tokenizer, vocab).save_pretrained(tmp)
        export_tokenizer(tokenizer_model, tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d, TP=%d, EP=%d gathered) -> %s as %s", info.path, info.meta["step"],
             info.meta["tensor_parallel"], info.meta.get("expert_parallel", 1), out, kind)
    return out


def _check_replaceable(out: Path) -> None:
    """An existing OUT_DIR is replaced only when it is a previous export (it has a config.json),
    so that a mistyped path never deletes unrelated files."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ExportError(f"{out} exists, is not empty and is not a Hugging Face export (no config.json); "
                          "choose a new or empty directory")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; a previous export there is removed only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:  # put the previous export back
            os.rename(old / out.name, out)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def _generation_config(tokenizer, vocab_size: int):
    from transformers import GenerationConfig

    # The vocabulary is padded for tensor parallelism; the padded ids are never real tokens.
    padded = list(range(tokenizer.vocab_size, vocab_size))
    return GenerationConfig(eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod,
                            bos_token_id=tokenizer.bos if tokenizer.bos >= 0 else tokenizer.eod,
                            suppress_tokens=padded or None)


def _write_gpt_neo(cfg, state, tokenizer, folder: Path) -> int:
    from transformers import GPTNeoForCausalLM

    from megalong.export.gpt_neo import to_gpt_neo

    hf_config, tensors = to_gpt_neo(cfg, state, tokenizer.bos, tokenizer.eod)
    model = GPTNeoForCausalLM(hf_config)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to wte
    if missing or result.unexpected_keys:
        raise ExportError(f"weight mapping incomplete: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
    return hf_config.vocab_size


def megalong_refusal(cfg) -> Optional[str]:
    """Why even megalong's own Hugging Face class cannot hold this model (None when it can)."""
    from megalong.export.hf_layers import export_refusal

    if (reason := export_refusal(cfg)) is not None:
        return reason
    if "moe" in cfg.mlp_kinds() and cfg.moe_options().router == "expert_choice":
        return ("model.moe.router is 'expert_choice': experts choose among all tokens of the batch, "
                "so a token's output depends on later tokens and generation cannot reproduce training")
    return None


# Files written beside an export of MegalongForCausalLM, so that `trust_remote_code=True` finds the
# classes; they come from the installed megalong package.
_REMOTE_CODE = {
    "configuration_megalong.py": "from megalong.export.modeling import MegalongConfig  # noqa: F401\n",
    "modeling_megalong.py": "from megalong.export.modeling import MegalongConfig, MegalongForCausalLM  # noqa: F401\n",
}


def _write_megalong(cfg, state, tokenizer, folder: Path) -> int:
    from megalong.export.modeling import MegalongConfig, MegalongForCausalLM

    vocab = state["embedding.word_embeddings.weight"].shape[0]
    hf_config = MegalongConfig(megalong_model=cfg.to_dict()["model"], vocab_size=vocab,
                               bos_token_id=tokenizer.bos if tokenizer.bos >= 0 else tokenizer.eod,
                               eos_token_id=tokenizer.eod)
    hf_config.architectures = ["MegalongForCausalLM"]
    hf_config.auto_map = {"AutoConfig": "configuration_megalong.MegalongConfig",
                          "AutoModelForCausalLM": "modeling_megalong.MegalongForCausalLM"}
    model = MegalongForCausalLM(hf_config)
    result = model.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")},
                                   strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"weight mapping incomplete: missing {result.missing_keys}, "
                          f"unexpected {result.unexpected_keys}")
    model.save_pretrained(folder, safe_serialization=True)
    for name, text in _REMOTE_CODE.items():
        (folder / name).write_text(text)
    return vocab


def _write_mixtral(cfg, state, tokenizer, folder: Path) -> int:
    from safetensors.torch import save_file

    from megalong.export.mixtral import to_mixtral

    hf_config, tensors = to_mixtral(cfg, state, tokenizer.bos, tokenizer.eod)
    hf_config.architectures = ["MixtralForCausalLM"]
    hf_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return hf_config.vocab_size
