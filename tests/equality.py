"""What "the same as one process" means in the training-equality tests: the tolerances and the
comparisons of losses, gradient norms and final weights between a parallel run and its
one-process reference (both save directories of `megalong train`)."""
from __future__ import annotations

from pathlib import Path

from conftest import read_metrics
from megalong.checkpoint.step import load_merged_state

LOSS_TOL = 2e-5
WEIGHT_TOL = 1e-4


def close_losses(losses: dict[int, float], reference: dict[int, float], steps, name: str) -> None:
    assert sorted(losses) == list(steps), (name, sorted(losses))
    for step in steps:
        assert abs(losses[step] - reference[step]) < LOSS_TOL, (name, step, losses[step], reference[step])


def close_norms(save_dir: Path, reference_dir: Path, name: str) -> None:
    """Gradient norms before clipping, relative 1e-4: Adam is blind to a wrong gradient scale
    (the losses would still agree), the norm is not."""
    norms, reference = read_metrics(save_dir, "train/grad_norm"), read_metrics(reference_dir, "train/grad_norm")
    assert sorted(norms) == sorted(reference), name
    for step, value in reference.items():
        assert abs(norms[step] - value) < 1e-4 * value, (name, step, norms[step], value)


def same_weights(run: Path, reference: Path, name: str) -> None:
    """Every tensor of the final checkpoints within WEIGHT_TOL."""
    _, want = load_merged_state(reference)
    _, got = load_merged_state(run)
    assert got.keys() == want.keys(), name
    for key, tensor in want.items():
        assert (got[key] - tensor).abs().max().item() < WEIGHT_TOL, (name, key)
