"""data.split: the three splits' names and their shares, parsed as megatron-core reads them."""
from __future__ import annotations

import re

from megalong.config import ConfigError

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'98,2,0' -> [0.98, 0.02, 0.0]; up to three non-negative shares (missing ones are 0)."""
    parts = [part.strip() for part in str(split).split(",")]
    # Plain decimals only: megatron re-reads the string with the pattern [.0-9]+.
    if not all(re.fullmatch(r"[0-9]*\.?[0-9]+|[0-9]+\.", part) for part in parts):
        raise ConfigError(f"data.split: expected comma-separated numbers like '98,2,0', got '{split}'")
    shares = [float(part) for part in parts]
    if not 1 <= len(shares) <= 3 or sum(shares) <= 0:
        raise ConfigError(f"data.split: expected up to three non-negative shares with a positive sum "
                          f"like '98,2,0', got '{split}'")
    shares += [0.0] * (3 - len(shares))
    return [s / sum(shares) for s in shares]
