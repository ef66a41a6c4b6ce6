"""Per-kind attention options: the keys a config may set under `model.attention.<kind>`.

Kept free of torch so that the config can be validated before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GlobalOptions:
    """Full causal attention: every token sees itself and everything before it."""


@dataclass
class LocalOptions:
    """Causal sliding window: a token sees itself and the previous `window - 1` tokens (GPT-Neo)."""

    window: int = 256


ATTENTION_OPTIONS: dict[str, type] = {
    "global": GlobalOptions,
    "local": LocalOptions,
}
