"""What a checkpoint format is, and which formats there are.

A format writes and reads the model and optimizer files of a step directory; everything else of
the directory (its temporary name and commit, config.yaml, tokenizer, RNG states, meta.json,
`latest`, keep_last) is megalong/checkpoint/step.py's and megalong/checkpoint/layout.py's, the same
for every format. Engines hand a format their state as a `TrainState`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    import torch

    from megalong.checkpoint.step import CheckpointInfo
    from megalong.config import Config
    from megalong.parallel.distributed import ParallelLayout

AdamState = Mapping["torch.nn.Parameter", dict[str, "torch.Tensor"]]


class TrainState(Protocol):
    """A rank's model chunks (unwrapped: what `chunks_of` names) and Adam state, whole per
    parameter, as an engine holds them."""

    chunks: list[torch.nn.Module]

    def adam_state(self) -> AdamState:
        """{parameter: {exp_avg, exp_avg_sq, step}}, whole; collective for sharded optimizers."""
        ...

    def load_adam_state(self, state: AdamState) -> None: ...

    def param_groups(self) -> list[dict]:
        """The optimizer's param groups (their hyper-parameters are recorded in meta.json)."""
        ...


class CheckpointFormat(Protocol):
    name: str  # meta.json's "format" and `train.checkpoint_format`

    def save(self, step_dir: Path, step: int, cfg: Config, state: TrainState, layout: ParallelLayout) -> dict[str, Any]:
        """Write this rank's model and optimizer files (collective); returns meta.json entries."""
        ...

    def load(self, info: CheckpointInfo, cfg: Config, state: TrainState, layout: ParallelLayout) -> None:
        """Restore this rank's weights and Adam state in place, from any layout (collective)."""
        ...

    def whole_model(self, info: CheckpointInfo) -> dict[str, torch.Tensor]:
        """The one-process model's weights."""
        ...


def checkpoint_format(name: str) -> CheckpointFormat:
    """The format `train.checkpoint_format` (or meta.json's "format") names."""
    if name == "megatron":
        from megalong.checkpoint.dist import DistFormat

        return DistFormat()
    from megalong.checkpoint.native import NativeFormat

    return NativeFormat()
