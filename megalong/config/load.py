"""YAML files and `--set` overrides -> a typed Config: merge, unique keys, key and type checks.

Every error names the offending key (`model.num_attention_heads`, `data.train[0].path`, ...) and,
for unknown keys, suggests the closest valid one. Attention and MoE options become their typed
objects here, once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from megalong.config.errors import ConfigError, suggest
from megalong.config.migrate import refuse_moved_keys
from megalong.config.schema import Config, DatasetEntry
from megalong.config.validate import validate

MAX_CONFIG_BYTES = 16 << 20  # a config is a small text file; anything larger is the wrong file
T = TypeVar("T")


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        return _check_float(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _check_float(value: Any, key: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def build_section(cls: type[T], raw: Any, key: str) -> T:
    """The dataclass `cls` from the mapping `raw` (None: its defaults), every key known and of its
    field's type; nested dataclasses and per-kind options (field metadata `options_by_kind`) built
    too. `key` is the section's dotted name for messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for name, value in raw.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{full}'{suggest(str(name), fields)}")
        hint = hints[name]
        by_kind = fields[name].metadata.get("options_by_kind")
        if by_kind is not None:
            values[name] = _options_by_kind(by_kind, value, full)
        elif dataclasses.is_dataclass(hint):
            values[name] = build_section(hint, value, full)  # type: ignore[arg-type]
        else:
            values[name] = _check_type(value, hint, full)
    return cls(**values)


def _options_by_kind(classes: dict[str, type], raw: Any, key: str) -> dict[str, Any]:
    """{"local": {"window": 8}} -> {"local": LocalOptions(window=8)}, each kind known."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    out = {}
    for kind, options in raw.items():
        if kind not in classes:
            raise ConfigError(f"{key}.{kind}: unknown attention kind{suggest(str(kind), classes)}")
        out[kind] = options if isinstance(options, classes[kind]) else build_section(
            classes[kind], options, f"{key}.{kind}")
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from one mapping of sections (keys and types checked, values not validated)."""
    if isinstance(raw, dict):
        refuse_moved_keys(raw)
    cfg = build_section(Config, raw, "")
    cfg.data.train = [_dataset_entry(e, f"data.train[{i}]") for i, e in enumerate(cfg.data.train)]
    return cfg


def _dataset_entry(entry: Any, key: str) -> DatasetEntry:
    if isinstance(entry, DatasetEntry):
        return entry
    if isinstance(entry, str):
        return DatasetEntry(path=entry)
    return build_section(DatasetEntry, entry, key)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML keeps the last one
    silently, so a repeated `lr:` would hide the first)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: the constructor below reports it
            continue
        if repeated:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def parse_override(item: str) -> dict:
    """`train.lr=3e-4` -> {"train": {"lr": 0.0003}} (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.lr=3e-4")
    dotted, value = item.split("=", 1)
    parts = dotted.strip().split(".")
    if any(not part.strip() for part in parts):
        raise ConfigError(f"override '{item}': expected a dotted key before '=', e.g. train.lr=3e-4")
    try:
        parsed = yaml.load(value, UniqueKeyLoader) if value != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)})") from None
    except ConfigError as e:
        raise ConfigError(f"override '{item}': {e}") from None
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = parsed
    return out


def _read_config_text(p: Path) -> str:
    """The text of a config file; a directory, a binary or huge file, or one that cannot be read
    is a ConfigError naming it."""
    if p.is_dir():
        hint = (f" (a checkpoint? resume it with --set train.load={p})"
                if (p / "meta.json").is_file() or (p / "latest").is_file() else "")
        raise ConfigError(f"{p}: is a directory, not a YAML config file{hint}")
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size:,} bytes is not a config file (YAML text, "
                              f"at most {MAX_CONFIG_BYTES >> 20} MiB); is it the right file?")
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (not UTF-8 at byte {e.start}); a config is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it holds NUL bytes); a config is YAML text")
    return text


def load_raw(paths: Sequence[str | os.PathLike], overrides: Sequence[str] = ()) -> dict:
    """The merged mapping of the YAML files (later ones win) and then the overrides."""
    raw: dict = {}
    for path in paths:
        p = Path(path)
        text = _read_config_text(p)
        try:
            loaded = yaml.load(text, UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, "
                              f"train:, ...), got {type(loaded).__name__}")
        raw = deep_merge(raw, loaded)
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    return raw


def load_config(paths: Sequence[str | os.PathLike], overrides: Sequence[str] = (),
                check_paths: bool = True, world_size: int = 1) -> Config:
    """Load, merge (later files and overrides win) and validate a configuration."""
    cfg = config_from_dict(load_raw(paths, overrides))
    validate(cfg, check_paths=check_paths, world_size=world_size)
    return cfg
