"""`megalong import HF_DIR OUT_DIR`: a Hugging Face folder as a step-0 megalong checkpoint.

OUT_DIR becomes a save_dir: `step_00000000/` (megalong's native format, written by the code that
writes training checkpoints, with empty optimizer state), `latest`, the SentencePiece
`tokenizer.model`, the folder's other tokenizer files under `hf_tokenizer/`, and `megalong.yaml`:
the derived model section with `data.tokenizer` and `train.load` set, for the user to edit and
train from. The weights are loaded into a one-process megalong model first, so every name and
shape is checked before anything is written."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from megalong.config import ConfigError, config_from_dict, validate
from megalong.hf_import.families import architecture, map_model
from megalong.hf_import.folder import HFImportError, Tensors, read_hf_config, read_hf_tensors
from megalong.hf_import.hf_keys import HFConfig
from megalong.paths import check_writable_dir

log = logging.getLogger("megalong")

CONFIG_NAME = "megalong.yaml"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json")


class _WeightsOnly:
    """A TrainState without optimizer state: a step-0 checkpoint resumes with a fresh Adam."""

    def __init__(self, model: torch.nn.Module):
        self.chunks = [model]

    def adam_state(self) -> dict:
        return {}

    def load_adam_state(self, state) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return []


def find_tokenizer(folder: Path, tokenizer: Optional[str]) -> Path:
    path = Path(tokenizer) if tokenizer else folder / "tokenizer.model"
    if not path.is_file():
        raise HFImportError(f"{path}: missing; megalong trains with a SentencePiece .model and {folder} has "
                            "none (a tokenizer.json alone is not enough): pass --tokenizer FILE.model")
    return path


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: Optional[str] = None) -> Path:
    """Import the folder `hf_dir` into `out_dir` (new or empty); returns the step directory."""
    from megalong.data.tokenizer import SentencePieceTokenizer

    folder, out = Path(hf_dir).resolve(), Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFImportError(f"{out}: exists and is not an empty directory; choose a new one")
    check_writable_dir(out, "out_dir")
    c = HFConfig(read_hf_config(folder), str(folder / "config.json"))
    architecture(c)  # an unknown one is refused before anything is read
    tokenizer_path = find_tokenizer(folder, tokenizer)
    pieces = SentencePieceTokenizer(tokenizer_path).vocab_size
    name, model, state = map_model(c, Tensors(read_hf_tensors(folder), folder))
    vocab = model.get("vocab_size") or pieces
    if vocab < pieces:
        raise HFImportError(f"{c.path}: vocab_size = {vocab} is smaller than the {pieces} pieces of {tokenizer_path}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        step_dir = _write(out, model, state, tokenizer_path, folder, pieces)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("imported %s (%s) -> %s", folder, name, step_dir)
    return step_dir


def _config(model: dict, tokenizer: Path, step_dir: Optional[Path] = None):
    raw = {"model": model, "data": {"tokenizer": str(tokenizer)}}
    if step_dir is not None:
        raw["train"] = {"load": str(step_dir)}
    try:
        cfg = config_from_dict(raw)
        validate(cfg, check_paths=False)
    except ConfigError as e:
        raise HFImportError(f"the megalong config derived from the folder is not valid: {e}") from None
    return cfg


def _write(out: Path, model: dict, state: dict, source_tokenizer: Path, folder: Path, pieces: int) -> Path:
    from megalong.checkpoint.model_state import load_weights
    from megalong.checkpoint.native import NativeFormat
    from megalong.checkpoint.step import save_step
    from megalong.model.gpt import build_model
    from megalong.parallel.distributed import initialize

    tokenizer = out / "tokenizer.model"
    shutil.copyfile(source_tokenizer, tokenizer)
    kept = [f for f in HF_TOKENIZER_FILES if (folder / f).is_file()]
    if kept:
        (out / "hf_tokenizer").mkdir()
        for f in kept:
            shutil.copyfile(folder / f, out / "hf_tokenizer" / f)
    cfg = _config(model, tokenizer)
    layout = initialize(1)
    torch.manual_seed(cfg.train.seed)
    megalong_model = build_model(cfg, pieces)
    load_weights(megalong_model, state, str(folder))  # every name and shape checked
    step_dir = save_step(out, 0, cfg, layout,
                         lambda tmp: NativeFormat().save(tmp, 0, cfg, _WeightsOnly(megalong_model), layout), pieces)
    editable = _config(model, tokenizer, step_dir).to_dict()
    text = yaml.safe_dump({"model": editable["model"], "data": {"tokenizer": str(tokenizer)},
                           "train": {"load": str(step_dir)}}, sort_keys=False)
    (out / CONFIG_NAME).write_text(
        f"# megalong's config for {folder.name}, imported from {folder}.\n"
        "# Train from it with: megalong train megalong.yaml YOUR_DATA.yaml --set train.save_dir=RUN\n"
        "# (train.load starts from the imported weights at step 0 with a fresh optimizer; changing a\n"
        "# model key makes the checkpoint incompatible).\n" + text)
    return step_dir
