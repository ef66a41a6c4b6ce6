"""argparse types for numbers with a range: `--batch-size 0` is refused by argparse with the option
named (`argument --batch-size: must be an integer >= 1, got '0'`), before any work."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(low: float, high: Optional[float] = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] with low_open)."""
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high is not None:
        bound += f" and <= {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}") from None
        if (not math.isfinite(value) or (value <= low if low_open else value < low)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
