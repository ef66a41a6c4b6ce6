"""Per-kind attention options: the keys a config may set under `model.attention.<kind>`.

Kept free of torch so that the config can be validated before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass


class OptionError(ValueError):
    """An attention option that does not fit; the config names it as model.attention.<kind>.<key>."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class ModelShape:
    """What an attention kind's options are checked against (see `check`)."""

    seq_length: int
    num_heads: int
    head_dim: int
    tensor_parallel: int


@dataclass
class GlobalOptions:
    """Full causal attention: every token sees itself and everything before it."""


@dataclass
class LocalOptions:
    """Causal sliding window: a token sees itself and the previous `window - 1` tokens (GPT-Neo)."""

    window: int = 256

    def check(self, shape: ModelShape) -> None:
        if self.window < 1:
            raise OptionError("window", f"must be >= 1, got {self.window}")


# Every options class may define `check(self, shape: ModelShape) -> None`, raising OptionError for
# a value that does not fit the sequence length or the parallel layout; config validation calls it.
ATTENTION_OPTIONS: dict[str, type] = {
    "global": GlobalOptions,
    "local": LocalOptions,
}
