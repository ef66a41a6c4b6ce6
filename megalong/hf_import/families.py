"""Which Hugging Face architectures import, and each one's mapping: config.json -> megalong's
`model` section, safetensors -> megalong's state dict (every tensor taken exactly once)."""
from __future__ import annotations

from typing import Any

import torch

from megalong.hf_import import gpt_neo, llama, megalong_class
from megalong.hf_import.folder import HFImportError, Tensors
from megalong.hf_import.hf_keys import HFConfig

ARCHITECTURES = ("GPTNeoForCausalLM", *llama.ARCHITECTURES, "MegalongForCausalLM")


def architecture(c: HFConfig) -> str:
    names = c.require("architectures")
    if not isinstance(names, list) or len(names) != 1:
        c.refuse("architectures", "expected one architecture")
    if names[0] not in ARCHITECTURES:
        c.refuse("architectures", f"megalong imports {', '.join(ARCHITECTURES)}")
    return names[0]


def map_model(c: HFConfig, tensors: Tensors) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, megalong model section, megalong state dict); refuses, naming the key or
    tensor, whatever it cannot represent exactly."""
    name = architecture(c)
    if name == "GPTNeoForCausalLM":
        model = gpt_neo.model_section(c)
        state = gpt_neo.megalong_state(model, tensors)
    elif name == "MegalongForCausalLM":
        model = megalong_class.model_section(c)
        state = megalong_class.megalong_state(tensors)
    else:
        family = llama.check_family(c, name)
        model = llama.model_section(c, family)
        state = llama.megalong_state(model, family, tensors)
    tensors.check_all_taken()
    if not state:
        raise HFImportError(f"{tensors.source}: no tensors")
    return name, model, state
