"""Keys that moved between sections: a user config naming the old place is refused with the new
one; a checkpoint's or export's saved config written before the move is migrated when read."""
from __future__ import annotations

import copy
from typing import Any

from megalong.config.errors import ConfigError

# (old section, key) -> (new section, key). The execution keys left `model` (architecture only)
# and `train`, so that a checkpoint resumes when only they change.
MOVED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("model", "kernels"): ("execution", "kernels"),
    ("model", "loss_chunks"): ("execution", "loss_chunks"),
    ("model", "ffn_chunks"): ("execution", "ffn_chunks"),
    ("model", "recompute_granularity"): ("execution", "recompute_granularity"),
    ("model", "recompute_method"): ("execution", "recompute_method"),
    ("model", "recompute_num_layers"): ("execution", "recompute_num_layers"),
    ("train", "precision"): ("execution", "precision"),
    ("train", "compile"): ("execution", "compile"),
}


def refuse_moved_keys(raw: dict[str, Any]) -> None:
    """A ConfigError naming the first key given at its old place, and where it moved."""
    for (section, key), (new_section, new_key) in MOVED_KEYS.items():
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            raise ConfigError(f"{section}.{key} moved to {new_section}.{new_key}")


def migrate_saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a checkpoint's config.yaml, an export's megalong_model) with every moved
    key at its new place; a value already at the new place wins. `raw` is not changed."""
    out = copy.deepcopy(raw)
    for (section, key), (new_section, new_key) in MOVED_KEYS.items():
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        target = out.get(new_section)
        if target is None:
            target = out[new_section] = {}
        if isinstance(target, dict):
            target.setdefault(new_key, value)
    return out
