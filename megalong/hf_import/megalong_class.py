"""megalong's own MegalongForCausalLM export back to megalong: config.json holds the `model` section
(`megalong_model`), and the state dict has megalong's names already."""
from __future__ import annotations

from typing import Any

import torch

from megalong.hf_import.folder import HFImportError, Tensors
from megalong.hf_import.hf_keys import HFConfig


def model_section(c: HFConfig) -> dict[str, Any]:
    model = c.require("megalong_model")
    if not isinstance(model, dict):
        c.refuse("megalong_model", "expected the mapping of megalong's model section")
    return dict(model)


def megalong_state(t: Tensors) -> dict[str, torch.Tensor]:
    out = {name: t.take(name) for name in list(t.tensors)}
    if not out:
        raise HFImportError(f"{t.source}: no tensors")
    return out
