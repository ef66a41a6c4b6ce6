"""Per-layer patterns: `[[["global", "local"], 6]]` (GPT-Neo's form) expanded to one kind per layer."""
from __future__ import annotations

from typing import Any

from megalong.config.errors import ConfigError


def expand_layer_pattern(pattern: Any, key: str) -> list[str]:
    """`[[["global", "local"], 2]]` -> ["global", "local", "global", "local"].

    Also accepts a flat list of kinds (`["global", "local"]`) or one kind for every layer.
    """
    if isinstance(pattern, str):
        return [pattern]
    if not isinstance(pattern, list):
        raise ConfigError(f"{key}: expected a list of [pattern, repeat] pairs, got {pattern!r}")
    kinds: list[str] = []
    for i, item in enumerate(pattern):
        if isinstance(item, str):
            kinds.append(item)
        elif (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)
              and isinstance(item[0], (list, str))):
            block = [item[0]] if isinstance(item[0], str) else item[0]
            if not all(isinstance(k, str) for k in block):
                raise ConfigError(f"{key}[{i}]: a pattern is a list of attention kinds, got {item[0]!r}")
            if item[1] < 1:
                raise ConfigError(f"{key}[{i}]: repeat count must be >= 1, got {item[1]}")
            kinds.extend(block * item[1])
        else:
            raise ConfigError(
                f"{key}[{i}]: expected a kind or a [pattern, repeat] pair such as "
                f'[["global", "local"], 6], got {item!r}')
    return kinds
