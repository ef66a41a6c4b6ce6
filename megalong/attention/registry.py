"""Attention kinds by name: the only place that maps a config's kind to a module."""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from megalong.attention.base import CoreAttention
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention
from megalong.attention.options import ATTENTION_OPTIONS

CORE_ATTENTION: dict[str, type[CoreAttention]] = {
    "global": GlobalAttention,
    "local": LocalAttention,
}
assert CORE_ATTENTION.keys() == ATTENTION_OPTIONS.keys(), "options and modules must list the same kinds"


def core_attention_spec(kind: str, options: Any, alibi: bool) -> ModuleSpec:
    """The ModuleSpec for the `core_attention` slot of megatron's SelfAttention."""
    return ModuleSpec(module=CORE_ATTENTION[kind],
                      params={"alibi": alibi, **dataclasses.asdict(options)})
