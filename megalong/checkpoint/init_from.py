"""`train.init_from: PATH`: a fresh run starts from another model's weights only (no optimizer
state, schedule, step or data position), into the current config, which may differ from the
source in execution keys, sequence length and the attention kind of any layer ("attention
surgery"). PATH is a megalong checkpoint (a step directory or a save_dir: its newest) or a Hugging
Face folder (config.json: read through the importer, megalong/hf_import/).

Entries are matched by their one-process name and shape: those in both are carried, those only
the current model has keep the initialisation its kind documents ("new"), those only the source
has are dropped. A carried name whose shape differs is an error naming the tensor, except a layer
turned `lsh`, whose fused q/v projection takes the source's queries and values (shared QK)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megalong.checkpoint.model_state import load_weights, loading_dims, rank_slice
from megalong.checkpoint.names import chunks_of, global_names, is_expert_key, tied_source
from megalong.config import Config
from megalong.errors import CheckpointError
from megalong.parallel.distributed import ParallelLayout

KEY = "train.init_from"


@dataclass
class InitReport:
    source: str
    carried: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)  # carried in another form (lsh: q and v of q/k/v)

    def lines(self) -> list[str]:
        """The log's table: one row per tensor, its fate and name."""
        rows = [f"{KEY}: weights from {self.source} ({len(self.carried)} carried, {len(self.new)} new, "
                f"{len(self.dropped)} dropped; optimizer, schedule, step and data start fresh)",
                f"  {'tensor':<8} name"]
        for fate, names in (("carried", self.carried), ("new", self.new), ("dropped", self.dropped)):
            rows.extend(f"  {fate:<8} {name}" + (" (q, v of q/k/v: lsh shares queries and keys)"
                                                  if name in self.converted else "") for name in names)
        return rows


def source_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The one-process weights PATH holds, read without running code (safetensors only)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{KEY}: {p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():  # a Hugging Face folder
        from megalong.hf_import.families import map_model
        from megalong.hf_import.folder import Tensors, read_hf_config, read_hf_tensors
        from megalong.hf_import.hf_keys import HFConfig

        c = HFConfig(read_hf_config(p), str(p / "config.json"))
        return map_model(c, Tensors(read_hf_tensors(p), p))[2]
    from megalong.checkpoint.step import load_merged_state

    try:
        return load_merged_state(p)[1]
    except CheckpointError as e:
        raise CheckpointError(f"{KEY}: {e}") from None


def _full_shape(local: torch.Tensor, dim: Any, name: str, layout: ParallelLayout) -> tuple[int, ...]:
    shape = list(local.shape)
    if dim is not None:
        shape[dim] *= layout.tensor_parallel
    if is_expert_key(name) and local.ndim:
        shape[0] *= layout.expert_parallel
    return tuple(shape)


def shared_qk(name: str, tensor: torch.Tensor, cfg: Config) -> torch.Tensor | None:
    """A source layer's fused q/k/v weight or bias as an `lsh` layer's fused q/v (shared QK: its
    keys are its normalised queries, so the source's keys are left out), when `name` is that layer's
    linear_qkv and the source had one key/value head per query head; else None."""
    parts = name.split(".")
    if len(parts) != 6 or parts[:2] != ["decoder", "layers"] or parts[3:5] != ["self_attention", "linear_qkv"]:
        return None
    m = cfg.model
    if cfg.layer_kinds()[int(parts[2])] != "lsh" or tensor.shape[0] != 3 * m.hidden_size:
        return None
    heads = m.num_attention_heads
    per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])  # [q_h, k_h, v_h] per head
    return per_head[:, [0, 2]].reshape(-1, *tensor.shape[1:]).contiguous()


def init_from(path: str | Path, cfg: Config, model: Any, layout: ParallelLayout) -> InitReport:
    """Load PATH's matching weights into this rank's `model` (a module or its chunks)."""
    source = source_state(path)
    tied = cfg.model.tie_embeddings
    dims = loading_dims(model, tied)
    report = InitReport(str(path))
    wanted: set[str] = set()
    per_chunk = []
    for chunk in chunks_of(model):
        own = chunk.state_dict()
        names = {}
        for local, name in zip(own, global_names(chunk, own)):
            if local.endswith("_extra_state") or not isinstance(own[local], torch.Tensor):
                continue
            stored = name if name in source else tied_source(name, tied)
            if stored not in source:
                report.new.append(name)
                continue
            expected = _full_shape(own[local], dims.get(name), name, layout)
            converted = shared_qk(name, source[stored], cfg) if tuple(source[stored].shape) != expected else None
            if converted is not None and tuple(converted.shape) == expected:
                source[stored] = converted
                report.converted.append(name)
            if tuple(source[stored].shape) != expected:
                raise CheckpointError(f"{KEY}: {path}: tensor {stored} has shape {tuple(source[stored].shape)}, "
                                      f"the model's {name} has {expected}")
            names[local] = stored
            wanted.add(stored)
        per_chunk.append((chunk, own, names))
    mine = rank_slice(source, dims, cfg, layout, wanted)
    for chunk, own, names in per_chunk:
        state = {local: (mine[names[local]] if local in names else value) for local, value in own.items()
                 if isinstance(value, torch.Tensor)}
        load_weights(chunk, state, str(path))
    carried, new, converted = _whole_model(wanted, set(report.new), set(report.converted))
    report.carried = sorted(carried)
    report.new = sorted(new)
    report.converted = sorted(converted)
    report.dropped = sorted(set(source) - carried)
    return report


def _whole_model(carried: set[str], new: set[str], converted: set[str]) -> tuple[set[str], set[str], set[str]]:
    """The names of every rank united: a pipeline stage holds only its layers and would report the
    other stages' tensors dropped; tensor-parallel and data-parallel ranks hold the same names."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return carried, new, converted
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sorted(carried), sorted(new), sorted(converted)))
    united: tuple[set[str], set[str], set[str]] = (set(), set(), set())
    for names in gathered:
        for whole, part in zip(united, names):
            whole.update(part)
    return united
