"""A local Hugging Face model folder, read without running code: config.json as JSON, weights only
from safetensors files (one `model.safetensors` or a sharded `model.safetensors.index.json`); a
folder holding only pickled weights (`pytorch_model.bin`, `*.pt`) is refused."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megalong.errors import MegalongError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class HFImportError(MegalongError):
    """A Hugging Face folder megalong cannot import exactly (names the file or config key)."""

    kind = "import"


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise HFImportError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    if not path.is_file():
        raise HFImportError(f"{path}: missing (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model's weights."""
    if (folder / INDEX).is_file():
        index = folder / INDEX
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFImportError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = []
        for name in names:
            path = (folder / str(name)).resolve()
            if path.parent != folder.resolve() or not path.name.endswith(".safetensors"):
                raise HFImportError(f"{index}: weight_map names {name!r}, not a .safetensors file of the folder")
            if not path.is_file():
                raise HFImportError(f"{path}: missing (named by {index.name})")
            files.append(path)
        return files
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    pickled = [name for name in PICKLED if (folder / name).exists()]
    if pickled:
        raise HFImportError(f"{folder / pickled[0]}: pickled weights can run code when loaded and are never read; "
                            "convert the model to safetensors first (model.save_pretrained(..., safe_serialization=True))")
    raise HFImportError(f"{folder}: no {WEIGHTS} or {INDEX}")


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            part = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise HFImportError(f"{path}: not a readable safetensors file ({e})") from None
        duplicate = sorted(part.keys() & tensors.keys())
        if duplicate:
            raise HFImportError(f"{path}: tensor {duplicate[0]!r} is also in another weight file")
        tensors.update(part)
    return tensors


class Tensors:
    """The folder's tensors handed out by name, each once: a name the mapping asks for that is
    missing is an error naming it, and `leftover` lists what no mapping took."""

    # Buffers older transformers versions saved beside the weights; they hold no learned values.
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.attention.bias", "attn.attention.masked_bias")

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path):
        self.tensors = {k: v for k, v in tensors.items() if not k.endswith(self.IGNORED_SUFFIXES)}
        self.source = source

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise HFImportError(f"{self.source}: tensor {name!r} is missing from the weights")
        return self.tensors.pop(name).float()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def drop(self, name: str) -> None:
        self.tensors.pop(name, None)

    def check_all_taken(self) -> None:
        if self.tensors:
            left = sorted(self.tensors)
            raise HFImportError(f"{self.source}: tensor {left[0]!r} (and {len(left) - 1} more) has no megalong "
                                "counterpart; the model cannot be imported exactly")
