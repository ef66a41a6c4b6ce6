"""ConfigError, and the closest-key suggestion every unknown-key message ends with."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from megalong.errors import MegalongError


class ConfigError(MegalongError):
    """A configuration problem, always naming the key it is about."""

    kind = "config"


def suggest(name: str, valid: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `valid`, else the list of valid keys."""
    names = list(valid)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(names))}"
