"""Whether a checkpoint's saved config and the current one describe the same model: the
architecture (the `model` section) only; execution, train, data and layout may all differ."""
from __future__ import annotations

from typing import Any

from megalong.config.schema import Config


def architecture_differences(saved: Config, current: Config) -> list[str]:
    """`model.<key>: checkpoint <v>, config <v>` for every architecture key that differs."""
    saved_model = saved.to_dict()["model"]
    current_model: dict[str, Any] = current.to_dict()["model"]
    return [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {v!r}"
            for k, v in current_model.items() if saved_model.get(k) != v]
