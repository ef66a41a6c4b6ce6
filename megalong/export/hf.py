"""`megalong export CHECKPOINT OUT_DIR [--target T]`: a Hugging Face folder that transformers loads
as is, as the plainest stock class that represents the model exactly (Llama, Mistral, Qwen2,
GPT-Neo, Mixtral), else as megalong's own MegalongForCausalLM (transformers' Auto classes with
trust_remote_code=True, megalong installed)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from megalong.errors import MegalongError
from megalong.paths import check_writable_dir
from megalong.checkpoint.files import TOKENIZER, checkpoint_tokenizer
from megalong.checkpoint.step import read_checkpoint_info, whole_model_state
from megalong.export.targets import CLASS_NAMES, TARGETS, choose_target, describe_refusals, megalong_refusal

__all__ = ["ExportError", "export_checkpoint", "megalong_refusal"]

log = logging.getLogger("megalong")


class ExportError(MegalongError):
    """A checkpoint that cannot be expressed in the requested Hugging Face format."""

    kind = "export"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, target: str = "auto") -> Path:
    """Merge TP shards and gather EP experts, map to the Hugging Face class `target` names (auto:
    the plainest stock class that represents the model exactly, megalong/export/targets.py), write
    config, safetensors, generation config and tokenizer.

    Written into a temporary folder beside OUT_DIR and renamed when complete: a refused or failed
    export leaves nothing behind. An existing OUT_DIR is replaced only if it is a previous export."""
    from megalong.export.tokenizer import export_tokenizer

    if target not in ("auto", *TARGETS):
        raise ExportError(f"--target {target!r}: one of auto, {', '.join(TARGETS)}")
    out = Path(out_dir).resolve()
    _check_replaceable(out)  # before the checkpoint is read: a bad OUT_DIR costs nothing
    if not out.exists():
        check_writable_dir(out, "out_dir")
    check_writable_dir(out.parent, "out_dir")
    info = read_checkpoint_info(checkpoint)
    tokenizer_model = info.path / TOKENIZER
    tokenizer = checkpoint_tokenizer(info.path)
    chosen, why_not = choose_target(info.config, target)
    if chosen is None:
        raise ExportError(f"{info.path} cannot be exported: {describe_refusals(why_not)}")

    state = whole_model_state(info)  # every file read and checked before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        vocab = _WRITERS[chosen](info.config, state, tokenizer, tmp)
        _generation_config(tokenizer, vocab).save_pretrained(tmp)
        export_tokenizer(tokenizer_model, tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d, TP=%d, EP=%d gathered) -> %s as %s", info.path, info.meta["step"],
             info.meta["tensor_parallel"], info.meta.get("expert_parallel", 1), out, CLASS_NAMES[chosen])
    if why_not:
        log.info("  plainer classes do not fit: %s", describe_refusals(why_not))
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
    from megalong.export.mixtral import to_mixtral

    hf_config, tensors = to_mixtral(cfg, state, tokenizer.bos, tokenizer.eod)
    hf_config.architectures = ["MixtralForCausalLM"]
    return _write_stock(hf_config, tensors, folder)


def _llama_writer(target: str):
    def write(cfg, state, tokenizer, folder: Path) -> int:
        from megalong.export.llama import to_hf

        return _write_stock(*to_hf(cfg, state, target, tokenizer.bos, tokenizer.eod), folder)

    return write


def _write_stock(hf_config, tensors: dict, folder: Path) -> int:
    """A stock class's config and its tensors under the class's on-disk names."""
    from safetensors.torch import save_file

    hf_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return hf_config.vocab_size


_WRITERS = {"gpt_neo": _write_gpt_neo, "mixtral": _write_mixtral, "megalong": _write_megalong,
            "llama": _llama_writer("llama"), "mistral": _llama_writer("mistral"), "qwen2": _llama_writer("qwen2")}
