"""Reading a Hugging Face config.json's keys for import: each value megalong cannot represent is
refused naming the key (`config.json: rope_scaling ...`)."""
from __future__ import annotations

import math
from typing import Any

from megalong.hf_import.folder import HFImportError


class HFConfig:
    """A config.json's values, with the checks every family shares."""

    def __init__(self, raw: dict[str, Any], path: str):
        self.raw, self.path = raw, path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key, default)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise HFImportError(f"{self.path}: key '{key}' is missing")
        return self.raw[key]

    def refuse(self, key: str, why: str) -> None:
        raise HFImportError(f"{self.path}: {key} = {self.raw.get(key)!r}: {why}")

    def expect(self, key: str, allowed: tuple, why: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            self.refuse(key, why)
        return value

    def rope_base(self) -> int:
        """RoPE's base from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling`
        (earlier versions); scaled or partial RoPE is refused."""
        params = self.raw.get("rope_parameters") or {}
        scaling = self.raw.get("rope_scaling") or {}
        for key, table in (("rope_parameters", params), ("rope_scaling", scaling)):
            kind = table.get("rope_type", table.get("type", "default"))
            if kind != "default":
                raise HFImportError(f"{self.path}: {key}.rope_type = {kind!r}: megalong has plain RoPE only "
                                    "(no scaled RoPE)")
            if table.get("partial_rotary_factor", 1.0) != 1.0:
                raise HFImportError(f"{self.path}: {key}.partial_rotary_factor: megalong rotates whole heads")
        if self.get("partial_rotary_factor", 1.0) != 1.0:
            self.refuse("partial_rotary_factor", "megalong rotates whole heads")
        theta = params.get("rope_theta", self.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta != int(theta) or theta < 2:
            raise HFImportError(f"{self.path}: rope_theta = {theta!r}: megalong's model.rotary_base is an integer > 1")
        return int(theta)

    def vocab_divisor(self, vocab: int) -> int:
        """The largest power of two up to 128 dividing the vocabulary: megalong pads its embedding
        to a multiple of this (here: not at all), and tensor parallelism needs it even."""
        return math.gcd(vocab, 128)
