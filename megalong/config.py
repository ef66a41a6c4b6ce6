"""Typed run configuration: dataclasses loaded from one or more YAML files, merged, validated.

Every error names the offending key (`model.num_attention_heads`, `data.train[0].path`, ...) and,
for unknown keys, suggests the closest valid one. Validation runs before any model, data or
process group is built, so a bad config never costs work.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megalong.attention.options import ATTENTION_OPTIONS, ModelShape, OptionError
from megalong.errors import MegalongError
from megalong.moe.options import MoEOptions

MLP_KINDS = ("dense", "moe")
MAX_CONFIG_BYTES = 16 << 20  # a config is a small text file; anything larger is the wrong file


class ConfigError(MegalongError):
    """A configuration problem, always naming the key it is about."""

    kind = "config"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AxialPositionConfig:
    """Axial position embeddings (model.position_embedding: axial): position p is (p // cols,
    p % cols) of `shape` [rows, cols]; a row and a column embedding, summed (`sum`, each of the
    hidden size) or concatenated (`concat`, hidden_size // 2 and the rest)."""

    shape: Optional[list] = None
    mode: Literal["sum", "concat"] = "sum"


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    max_position_embeddings: int = 256
    # Per-layer attention kinds as (pattern, repeat) pairs, as GPT-Neo writes them:
    # [[["global", "local"], 6]] is 12 layers alternating global and local.
    attention_layers: list = field(default_factory=lambda: [[["global"], 2]])
    # Options per attention kind, e.g. {"local": {"window": 256}}.
    attention: dict = field(default_factory=dict)
    # Per-layer MLP kinds, "dense" or "moe", in the same (pattern, repeat) form; default all dense.
    mlp_layers: Optional[list] = None
    moe: dict = field(default_factory=dict)  # MoEOptions keys (megalong/moe/options.py)
    alibi: bool = False  # ALiBi biases in every layer; needs position_embedding: none
    position_embedding: Literal["learned", "rope", "none", "axial"] = "learned"
    axial_position: AxialPositionConfig = field(default_factory=AxialPositionConfig)
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu_tanh", "gelu", "swiglu"] = "gelu_tanh"
    scale_attention: bool = True  # scores / sqrt(head_dim); GPT-Neo does not scale
    qkv_bias: bool = False
    linear_bias: bool = True  # bias of the output projection and the MLP
    tie_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    vocab_size: Optional[int] = None  # default: the tokenizer's
    make_vocab_size_divisible_by: int = 128
    # Triton kernels (megalong/kernels): auto runs them on CUDA where they apply; reference forces
    # the torch path everywhere. On the CPU the torch path always runs.
    kernels: Literal["auto", "reference"] = "auto"
    # Memory (megalong/model/reversible.py, chunked_ffn.py): reversible residual pairs, whose two
    # streams start as the embedding and are merged before the final norm by `reversible_merge`
    # (mean: (y1 + y2) / 2; split: streams start as e / 2, merged y1 + y2; second: y2); the dense
    # MLP run over `ffn_chunks` slices of the sequence;
    # megatron-core's activation recompute (granularity full|selective; method uniform|block and
    # num_layers for full) as the comparison point.
    reversible: bool = False
    reversible_merge: Literal["mean", "split", "second"] = "mean"
    ffn_chunks: int = 1
    loss_chunks: int = 1  # logits + cross-entropy over n sequence slices, recomputed in backward (chunked_loss.py)
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None


@dataclass
class DatasetEntry:
    path: str = ""  # megatron .bin/.idx prefix
    weight: float = 1.0


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None  # SentencePiece .model
    train: list = field(default_factory=list)  # list of DatasetEntry (or plain prefixes)
    split: str = "98,2,0"  # train, valid, test shares of the documents
    seq_length: Optional[int] = None  # default model.max_position_embeddings
    cache_dir: Optional[str] = None  # megatron dataset index cache; default <save_dir>/data_cache


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8  # micro_batch_size * data_parallel * accumulation steps
    train_steps: int = 100
    stop_at_step: Optional[int] = None  # stop early (the schedule still spans train_steps)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay_steps: Optional[int] = None  # default train_steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 5
    log_interval: int = 10
    save_dir: Optional[str] = None
    save_interval: Optional[int] = None  # default: only at the end
    load: Optional[str] = None  # checkpoint directory to resume from ("auto": save_dir)
    # A fresh run (no train.load) refuses a save_dir holding checkpoints unless this is true; then
    # they are deleted when the run starts (megalong/train/save_dir.py)
    overwrite: bool = False
    keep_last: Optional[int] = None  # keep only the newest N checkpoints (and the one resumed from)
    tensorboard_dir: Optional[str] = None
    # megatron: megalong's own step (torch or megatron-core DDP); deepspeed: DeepSpeed's engine
    # with ZeRO (the `deepspeed:` section, megalong/train/deepspeed_engine.py)
    engine: Literal["megatron", "deepspeed"] = "megatron"
    # megalong: per-rank torch files merged and re-split on load; megatron: megatron-core's
    # distributed checkpoint (dist_checkpointing, each rank reads its slice). Both load at any layout.
    checkpoint_format: Literal["megalong", "megatron"] = "megalong"
    peak_tflops: float = 989.0  # per device, for MFU (H100 SXM bf16 dense)
    progress_bar: bool = True
    # torch.compile each transformer layer (megalong/model/compile.py); the first steps compile
    compile: bool = False
    # A step whose loss or gradient norm is not finite (NaN/inf): `stop` ends the run with an error
    # naming the step, before anything is saved after it; `skip` drops the step's update (no
    # optimizer step, no change of Adam's moments or of MoE router biases), counts and logs it, and
    # stops the run after `max_skipped_steps` skipped steps in a row.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10


@dataclass
class ParallelConfig:
    tensor: int = 1
    expert: int = 1  # expert-parallel ranks: each holds model.moe.num_experts / expert experts
    pipeline: int = 1  # pipeline stages (megatron-core's 1F1B schedule)
    virtual_stages: int = 1  # model chunks per pipeline rank (> 1: interleaved 1F1B)
    # Optional uneven split: [layers on the first stage, layers on the last stage]; the others are
    # shared evenly by the middle stages (megatron's num_layers_in_first/last_pipeline_stage).
    pipeline_layers: Optional[list[int]] = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Data parallelism (megatron-core DDP and optimizer, megalong/train/megatron_dp.py):
    distributed_optimizer: bool = False  # Adam state and update sharded over data-parallel ranks
    overlap_grad_reduce: bool = False  # reduce gradient buckets while the backward still runs
    ddp_bucket_size: Optional[int] = None  # elements per gradient bucket (None: megatron's choice)


@dataclass
class DeepSpeedConfig:
    """Used with train.engine: deepspeed. Batch sizes, clipping, precision and the optimizer come
    from the train section; `config` adds other DeepSpeed JSON keys (e.g. zero_optimization.
    reduce_bucket_size) to the DeepSpeed config megalong derives."""
    zero_stage: int = 1  # 1: optimizer state, 2: + gradients, 3: + weights sharded over data-parallel ranks
    offload_optimizer: bool = False  # optimizer state and step in CPU memory (ZeRO-Offload)
    config: dict = field(default_factory=dict)


# DeepSpeed keys megalong derives from its own config; deepspeed.config may not set them.
DEEPSPEED_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                          "gradient_accumulation_steps", "gradient_clipping", "optimizer",
                          "scheduler", "bf16", "fp16", "zero_optimization.stage",
                          "zero_optimization.offload_optimizer")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    # ---- derived values, computed from the fields above ----
    @property
    def seq_length(self) -> int:
        return self.data.seq_length or self.model.max_position_embeddings

    @property
    def ffn_hidden_size(self) -> int:
        return self.model.ffn_hidden_size or 4 * self.model.hidden_size

    def layer_kinds(self) -> list[str]:
        """The attention kind of every layer, in order."""
        return expand_layer_pattern(self.model.attention_layers, "model.attention_layers")

    def mlp_kinds(self) -> list[str]:
        """"dense" or "moe" for every layer, in order."""
        if self.model.mlp_layers is None:
            return ["dense"] * self.model.num_layers
        return expand_layer_pattern(self.model.mlp_layers, "model.mlp_layers")

    def moe_options(self) -> MoEOptions:
        return MoEOptions(**self.model.moe)

    def attention_options(self, kind: str) -> Any:
        return ATTENTION_OPTIONS[kind](**self.model.attention.get(kind, {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Layer patterns
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with key and type checking
# --------------------------------------------------------------------------------------------


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


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


def _build(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        full = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(name), list(fields))}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, full)
        else:
            values[name] = _check_type(value, hint, full)
    return cls(**values)


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    cfg.data.train = [_dataset_entry(e, f"data.train[{i}]") for i, e in enumerate(cfg.data.train)]
    return cfg


def _dataset_entry(entry: Any, key: str) -> DatasetEntry:
    if isinstance(entry, DatasetEntry):
        return entry
    if isinstance(entry, str):
        return DatasetEntry(path=entry)
    return _build(DatasetEntry, entry, key)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
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


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


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
        parsed = yaml.load(value, _UniqueKeyLoader) if value != "" else None
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


def load_raw(paths: list[str | os.PathLike], overrides: list[str] = ()) -> dict:
    raw: dict = {}
    for path in paths:
        p = Path(path)
        text = _read_config_text(p)
        try:
            loaded = yaml.load(text, _UniqueKeyLoader) or {}
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


def load_config(paths: list[str | os.PathLike], overrides: list[str] = (),
                check_paths: bool = True, world_size: int = 1) -> Config:
    """Load, merge (later files and overrides win) and validate a configuration."""
    cfg = config_from_dict(load_raw(paths, overrides))
    validate(cfg, check_paths=check_paths, world_size=world_size)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation of values and of how they fit together
# --------------------------------------------------------------------------------------------


def _positive(value: Any, key: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def pipeline_split(cfg: Config) -> list[int]:
    """Number of layers of every pipeline stage (all virtual chunks of a rank together)."""
    p, n = cfg.parallel, cfg.model.num_layers
    if p.pipeline == 1:
        return [n]
    first, last = p.pipeline_layers if p.pipeline_layers is not None else (None, None)
    if first is None:
        return [n // p.pipeline] * p.pipeline
    middle = (n - first - last) // (p.pipeline - 2) if p.pipeline > 2 else 0
    return [first] + [middle] * (p.pipeline - 2) + [last]


def _validate_pipeline(cfg: Config, world_size: int) -> None:
    p, n = cfg.parallel, cfg.model.num_layers
    _positive(p.pipeline, "parallel.pipeline")
    _positive(p.virtual_stages, "parallel.virtual_stages")
    if world_size % (p.tensor * p.pipeline):
        raise ConfigError(f"parallel.pipeline: parallel.tensor x parallel.pipeline = {p.tensor} x "
                          f"{p.pipeline} does not divide the {world_size} processes")
    if p.pipeline == 1:
        if p.virtual_stages > 1:
            raise ConfigError(f"parallel.virtual_stages: {p.virtual_stages} needs parallel.pipeline > 1")
        if p.pipeline_layers is not None:
            raise ConfigError("parallel.pipeline_layers: needs parallel.pipeline > 1")
        return
    if p.pipeline_layers is not None:
        if p.virtual_stages > 1:
            raise ConfigError("parallel.pipeline_layers: an uneven split is not supported with "
                              "parallel.virtual_stages > 1")
        if (len(p.pipeline_layers) != 2 or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                                               for k in p.pipeline_layers)):
            raise ConfigError(f"parallel.pipeline_layers: expected [layers on the first stage, layers "
                              f"on the last stage], two positive integers, got {p.pipeline_layers}")
        rest = n - sum(p.pipeline_layers)
        if p.pipeline == 2 and rest != 0:
            raise ConfigError(f"parallel.pipeline_layers: {p.pipeline_layers} must add up to "
                              f"model.num_layers {n} with 2 stages")
        if p.pipeline > 2 and (rest < p.pipeline - 2 or rest % (p.pipeline - 2)):
            raise ConfigError(f"parallel.pipeline_layers: the {rest} layers left after {p.pipeline_layers} "
                              f"do not split evenly over the {p.pipeline - 2} middle stages "
                              f"(model.num_layers {n})")
    elif n % (p.pipeline * p.virtual_stages):
        raise ConfigError(f"parallel.pipeline: model.num_layers {n} is not a multiple of "
                          f"parallel.pipeline x parallel.virtual_stages = {p.pipeline} x {p.virtual_stages} "
                          f"(or give an uneven split in parallel.pipeline_layers)")
    dp = world_size // (p.tensor * p.pipeline)
    micro = cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size * dp)
    if p.virtual_stages > 1 and micro % p.pipeline:
        raise ConfigError(f"parallel.virtual_stages: the interleaved schedule needs the number of "
                          f"micro-batches per step ({micro} = train.global_batch_size / "
                          f"(train.micro_batch_size x data-parallel size)) to be a multiple of "
                          f"parallel.pipeline {p.pipeline}")


def validate(cfg: Config, check_paths: bool = True, world_size: int = 1) -> None:
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
                 "rotary_base", "init_std", "layernorm_epsilon"):
        _positive(getattr(m, name), f"model.{name}")
    if m.position_embedding == "rope" and m.rotary_base < 2:
        raise ConfigError(f"model.rotary_base: must be > 1 (every rotary frequency would be 1), "
                          f"got {m.rotary_base}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(m, name)}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads: {m.num_attention_heads} heads do not divide "
                          f"model.hidden_size {m.hidden_size}")

    kinds = cfg.layer_kinds()
    for i, kind in enumerate(kinds):
        if kind not in ATTENTION_OPTIONS:
            raise ConfigError(f"model.attention_layers: unknown attention kind '{kind}' (layer {i})"
                              f"{_suggest(kind, list(ATTENTION_OPTIONS))}")
    if len(kinds) != m.num_layers:
        raise ConfigError(f"model.attention_layers: the pattern expands to {len(kinds)} layers but "
                          f"model.num_layers is {m.num_layers}")
    for kind, options in m.attention.items():
        key = f"model.attention.{kind}"
        if kind not in ATTENTION_OPTIONS:
            raise ConfigError(f"{key}: unknown attention kind{_suggest(kind, list(ATTENTION_OPTIONS))}")
        _build(ATTENTION_OPTIONS[kind], options, key)
    shape = ModelShape(seq_length=cfg.seq_length, num_heads=m.num_attention_heads,
                       head_dim=m.hidden_size // m.num_attention_heads, tensor_parallel=cfg.parallel.tensor)
    for kind in dict.fromkeys(kinds):
        check = getattr(cfg.attention_options(kind), "check", None)
        if check is not None:
            try:
                check(shape)
            except OptionError as e:
                raise ConfigError(f"model.attention.{kind}.{e.key}: {e.message}") from None
    _validate_moe(cfg)
    for kind in dict.fromkeys(kinds):
        if m.alibi and getattr(ATTENTION_OPTIONS[kind], "alibi", True) is False:
            raise ConfigError(f"model.alibi: '{kind}' attention has no attention scores to bias; "
                              "use ALiBi without it")
    _validate_axial_position(cfg)
    _validate_memory(cfg)
    if m.alibi and m.position_embedding != "none":
        raise ConfigError("model.alibi: ALiBi replaces position embeddings; set "
                          f"model.position_embedding: none (it is '{m.position_embedding}')")
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError("model.position_embedding: rope needs an even head dimension")
    if "fam" in kinds:  # FAM tokens have no position, and pass the MLP once per block
        if m.position_embedding == "rope":  # rotates q and k; FAM tokens have no position to rotate by
            raise ConfigError("model.position_embedding: fam layers do not support rope; use learned, "
                              "axial, none or ALiBi")
        if any(k == "fam" and mlp == "moe" for k, mlp in zip(kinds, cfg.mlp_kinds())):
            raise ConfigError("model.mlp_layers: fam layers need a dense MLP, not moe")

    _positive(d.seq_length, "data.seq_length")
    if m.position_embedding == "learned" and cfg.seq_length > m.max_position_embeddings:
        raise ConfigError(f"data.seq_length: {cfg.seq_length} exceeds model.max_position_embeddings "
                          f"{m.max_position_embeddings} (learned positions cannot extrapolate)")
    _validate_data(cfg)
    _validate_train(cfg)

    _positive(p.tensor, "parallel.tensor")
    if m.num_attention_heads % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide model.num_attention_heads "
                          f"{m.num_attention_heads}")
    if cfg.ffn_hidden_size % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide the MLP width "
                          f"{cfg.ffn_hidden_size} (model.ffn_hidden_size)")
    _positive(p.expert, "parallel.expert")
    if p.expert > 1:
        if "moe" not in cfg.mlp_kinds():
            raise ConfigError(f"parallel.expert: {p.expert} needs MoE layers (model.mlp_layers)")
        if cfg.moe_options().num_experts % p.expert:
            raise ConfigError(f"parallel.expert: {p.expert} does not divide model.moe.num_experts "
                              f"{cfg.moe_options().num_experts}")
        if world_size % p.expert:
            raise ConfigError(f"parallel.expert: {p.expert} does not divide the {world_size} processes")
    if world_size % p.tensor:
        raise ConfigError(f"parallel.tensor: {p.tensor} does not divide the {world_size} processes")
    _validate_pipeline(cfg, world_size)
    dp = world_size // (p.tensor * p.pipeline)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")

    _validate_deepspeed(cfg)
    _validate_data_parallel(cfg)

    if check_paths:
        if not d.tokenizer:
            raise ConfigError("data.tokenizer: missing (path to a SentencePiece .model)")
        if not Path(d.tokenizer).is_file():
            raise ConfigError(f"data.tokenizer: file not found: {d.tokenizer}")
        if not d.train:
            raise ConfigError("data.train: no datasets given (list of .bin/.idx prefixes)")
        for i, entry in enumerate(d.train):
            for suffix in (".bin", ".idx"):
                if not Path(entry.path + suffix).is_file():
                    raise ConfigError(f"data.train[{i}].path: {entry.path}{suffix} not found")


_PLAIN_NUMBER = re.compile(r"[0-9]*\.?[0-9]+|[0-9]+\.")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    shares = [share.strip() for share in d.split.split(",")]
    # Plain decimals only (megatron re-reads the string with the pattern [.0-9]+; no nan or 1e3).
    if len(shares) != 3 or not all(_PLAIN_NUMBER.fullmatch(share) for share in shares):
        raise ConfigError(f"data.split: expected three comma-separated shares like '98,2,0', got '{d.split}'")
    if sum(float(share) for share in shares) <= 0:
        raise ConfigError(f"data.split: the shares add up to 0: '{d.split}'")
    if d.tokenizer is not None and d.tokenizer.endswith(".json"):
        raise ConfigError(f"data.tokenizer: {d.tokenizer} looks like a Hugging Face tokenizer.json; "
                          "training reads a SentencePiece .model (tokenizer.json is for preprocess only)")
    for i, entry in enumerate(d.train):
        if not entry.path:
            raise ConfigError(f"data.train[{i}].path: missing")
        if entry.path.endswith((".bin", ".idx")):
            raise ConfigError(f"data.train[{i}].path: give the .bin/.idx prefix without the suffix: "
                              f"{entry.path[:-4]}, not {entry.path}")
        _positive(entry.weight, f"data.train[{i}].weight")


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    for name in ("micro_batch_size", "global_batch_size", "train_steps", "lr", "eval_interval",
                 "eval_iters", "log_interval", "save_interval", "stop_at_step", "lr_decay_steps",
                 "peak_tflops", "adam_eps", "max_skipped_steps", "keep_last"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(t, name)}")
    for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}: must be >= 0, got {getattr(t, name)}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is larger than train.lr {t.lr}")
    if t.lr * t.weight_decay >= 1:
        raise ConfigError(f"train.weight_decay: train.lr x train.weight_decay = {t.lr * t.weight_decay:g} "
                          f">= 1; decoupled weight decay would flip the sign of every weight")
    if t.lr_decay_steps is not None and t.lr_decay_steps < t.warmup_steps:
        raise ConfigError(f"train.lr_decay_steps: {t.lr_decay_steps} is shorter than train.warmup_steps "
                          f"{t.warmup_steps} (decay steps count from step 0, warmup included)")
    if t.stop_at_step is not None and t.stop_at_step > t.train_steps:
        raise ConfigError(f"train.stop_at_step: {t.stop_at_step} is past train.train_steps {t.train_steps} "
                          f"(the run ends at train_steps; raise it to train longer)")
    if not 0 <= t.seed < 2**31:
        raise ConfigError(f"train.seed: must be in [0, 2^31), got {t.seed}")


def _validate_axial_position(cfg: Config) -> None:
    m = cfg.model
    shape = m.axial_position.shape
    if m.position_embedding != "axial":
        if shape is not None:
            raise ConfigError("model.axial_position: set, but model.position_embedding is "
                              f"'{m.position_embedding}', not axial")
        return
    if (not isinstance(shape, list) or len(shape) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in shape)):
        raise ConfigError(f"model.axial_position.shape: expected [rows, cols], two positive integers, "
                          f"got {shape!r}")
    if shape[0] * shape[1] < cfg.seq_length:
        raise ConfigError(f"model.axial_position.shape: {shape[0]} x {shape[1]} positions are fewer "
                          f"than the sequence length {cfg.seq_length}")
    if m.axial_position.mode == "concat" and m.hidden_size < 2:
        raise ConfigError("model.axial_position.mode: concat needs model.hidden_size >= 2")


def _validate_deepspeed(cfg: Config) -> None:
    """Which layouts the DeepSpeed engine supports; refused combinations name their key."""
    ds, p = cfg.deepspeed, cfg.parallel
    if ds.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: must be 1, 2 or 3, got {ds.zero_stage}")
    for dotted in DEEPSPEED_DERIVED_KEYS:
        node: Any = ds.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"deepspeed.config.{dotted}: set by megalong (from the train section, "
                              f"deepspeed.zero_stage or deepspeed.offload_optimizer); remove it here")
    if cfg.train.engine != "deepspeed":
        if ds != DeepSpeedConfig():
            raise ConfigError("deepspeed: this section is used only with train.engine: deepspeed")
        return
    if cfg.train.checkpoint_format != "megalong":
        raise ConfigError("train.checkpoint_format: megatron is not supported with train.engine: "
                          "deepspeed (DeepSpeed writes its own checkpoint files)")
    for key in ("distributed_optimizer", "overlap_grad_reduce", "ddp_bucket_size"):
        if getattr(p, key) != getattr(ParallelConfig, key):
            raise ConfigError(f"parallel.{key}: configures megatron-core's DDP, which train.engine: "
                              f"deepspeed does not use (ZeRO shards the optimizer state: "
                              f"deepspeed.zero_stage)")
    if cfg.train.compile:
        raise ConfigError("train.compile: not supported with train.engine: deepspeed (ZeRO's hooks "
                          "on the weights are not traced by torch.compile in megalong); use "
                          "train.engine: megatron")
    if p.pipeline > 1:
        raise ConfigError(f"parallel.pipeline: {p.pipeline} pipeline stages are not supported with "
                          f"train.engine: deepspeed (DeepSpeed's pipeline engine allows only ZeRO-1, and "
                          f"megalong does not run megatron-core's schedules under DeepSpeed); use "
                          f"train.engine: megatron")
    if p.expert > 1:
        raise ConfigError(f"parallel.expert: expert parallelism ({p.expert}) is not supported with "
                          f"train.engine: deepspeed (ZeRO would shard and average expert weights that "
                          f"differ across ranks); MoE layers with parallel.expert: 1 are")
    if ds.zero_stage == 3 and "moe" in cfg.mlp_kinds():
        raise ConfigError("deepspeed.zero_stage: ZeRO-3 is not supported with MoE layers (megalong's "
                          "experts use weights that ZeRO-3 has not gathered in the backward pass); "
                          "use zero_stage 1 or 2")
    if ds.zero_stage == 3 and cfg.train.nonfinite == "skip":
        raise ConfigError("train.nonfinite: skip is not supported with deepspeed.zero_stage 3 (DeepSpeed's "
                          "ZeRO-3 applies an update with a non-finite gradient in fp32 and bf16 and "
                          "cannot drop it); use nonfinite: stop or zero_stage 1 or 2")


def _validate_data_parallel(cfg: Config) -> None:
    size = cfg.parallel.ddp_bucket_size
    if size is not None and size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size: must be a positive number of elements, got {size}")


def _validate_memory(cfg: Config) -> None:
    m = cfg.model
    if m.ffn_chunks < 1:
        raise ConfigError(f"model.ffn_chunks: must be >= 1, got {m.ffn_chunks}")
    if cfg.seq_length % m.ffn_chunks:
        raise ConfigError(f"model.ffn_chunks: {m.ffn_chunks} does not divide the sequence length "
                          f"{cfg.seq_length}")
    if m.loss_chunks < 1:
        raise ConfigError(f"model.loss_chunks: must be >= 1, got {m.loss_chunks}")
    if cfg.seq_length % m.loss_chunks:
        raise ConfigError(f"model.loss_chunks: {m.loss_chunks} does not divide the sequence length "
                          f"{cfg.seq_length}")
    if m.reversible:
        if m.recompute_granularity is not None:
            raise ConfigError("model.recompute_granularity: reversible layers already recompute their "
                              "inputs; use one or the other")
    if m.recompute_granularity == "full":
        if m.recompute_method is None or m.recompute_num_layers is None:
            raise ConfigError("model.recompute_granularity: full recompute needs model.recompute_method "
                              "(uniform or block) and model.recompute_num_layers")
        if not 1 <= m.recompute_num_layers <= m.num_layers:
            raise ConfigError(f"model.recompute_num_layers: must be between 1 and model.num_layers "
                              f"{m.num_layers}, got {m.recompute_num_layers}")
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        raise ConfigError("model.recompute_method: only used with model.recompute_granularity: full")


def _validate_moe(cfg: Config) -> None:
    kinds = cfg.mlp_kinds()
    for i, kind in enumerate(kinds):
        if kind not in MLP_KINDS:
            raise ConfigError(f"model.mlp_layers: unknown MLP kind '{kind}' (layer {i})"
                              f"{_suggest(kind, list(MLP_KINDS))}")
    if len(kinds) != cfg.model.num_layers:
        raise ConfigError(f"model.mlp_layers: the pattern expands to {len(kinds)} layers but "
                          f"model.num_layers is {cfg.model.num_layers}")
    o = _build(MoEOptions, cfg.model.moe, "model.moe")
    if o.num_experts < 1:
        raise ConfigError(f"model.moe.num_experts: must be >= 1, got {o.num_experts}")
    if not 1 <= o.top_k <= o.num_experts:
        raise ConfigError(f"model.moe.top_k: {o.top_k} must be between 1 and model.moe.num_experts "
                          f"{o.num_experts}")
    if o.bias_update_rate < 0:
        raise ConfigError(f"model.moe.bias_update_rate: must be >= 0, got {o.bias_update_rate}")
    if o.bias_update_rate and o.router not in ("topk", "switch"):
        raise ConfigError(f"model.moe.bias_update_rate: bias balancing is for the topk and switch "
                          f"routers, not '{o.router}'")
    if o.router == "switch" and o.top_k != 1:
        raise ConfigError(f"model.moe.top_k: the switch router sends each token to one expert; set "
                          f"top_k: 1 (it is {o.top_k}) or use router: topk")
    if o.capacity_factor is not None and o.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor: must be > 0 (or null with dropless), got {o.capacity_factor}")
    if o.capacity_factor is None and not o.dropless:
        raise ConfigError("model.moe.capacity_factor: null needs model.moe.dropless: true")
    for name in ("expert_hidden_size",):
        _positive(getattr(o, name), f"model.moe.{name}")
    if o.num_shared_experts < 0:
        raise ConfigError(f"model.moe.num_shared_experts: must be >= 0, got {o.num_shared_experts}")
    for name in ("aux_loss_coeff", "z_loss_coeff"):
        if getattr(o, name) < 0:
            raise ConfigError(f"model.moe.{name}: must be >= 0, got {getattr(o, name)}")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocabulary padded so that every tensor-parallel rank holds an equal slice.

    The multiple does not depend on the TP size when it already divides `divisible_by`, so that
    TP=1 and TP=2 runs of one config have identical embeddings.
    """
    multiple = divisible_by * tensor_parallel // math.gcd(divisible_by, tensor_parallel)
    return -(-vocab_size // multiple) * multiple
