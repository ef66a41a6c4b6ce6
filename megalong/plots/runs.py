"""What `megalong plot` reads from a run directory (torch-free, matplotlib-free): the run's
`metrics.jsonl` (megalong/train/run_log.py writes it; a later line of the same step, from a resumed
run, replaces the earlier one) and the results `megalong eval --output RUN_DIR/eval*.jsonl` appended
in the same format: a record {"step", "report": "long_context", "seq_length", "perplexity", ...}
per evaluation length, with "passkey": {depth: accuracy} from `megalong eval --passkey` (the
newest step's of each length is plotted). Records of other reports are
not plotted here."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megalong.checkpoint.layout import METRICS
from megalong.errors import MegalongError

EXPERT_LOAD = re.compile(r"moe/layer(\d+)/expert(\d+)_load")
EVAL_RESULTS = "eval*.jsonl"  # megalong eval --output RUN_DIR/eval.jsonl
LONG_CONTEXT = "long_context"  # the "report" of a perplexity-at-a-length record


class PlotError(MegalongError):
    """A run directory or file `megalong plot` cannot read (names the file and line)."""

    kind = "plot"


@dataclass
class RunMetrics:
    """One run's series: metric -> {step: value} (None values, NaN in the run, left out), and its
    perplexity by evaluation length: [(seq_length, perplexity)], sorted, and its passkey accuracy
    by length: {depth: [(seq_length, accuracy)]}."""

    path: Path
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    perplexity_by_length: list[tuple[int, float]] = field(default_factory=list)
    passkey_by_length: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def points(self, key: str) -> tuple[list[int], list[float]]:
        values = self.series.get(key, {})
        steps = sorted(values)
        return steps, [values[s] for s in steps]

    def expert_load(self) -> tuple[list[int], list[list[float]]]:
        """(MoE layer numbers, per layer each expert's share of the assignments, averaged over the
        logged steps); empty without MoE layers."""
        shares: dict[int, dict[int, float]] = {}
        for key, values in self.series.items():
            match = EXPERT_LOAD.fullmatch(key)
            if match and values:
                layer, expert = int(match.group(1)), int(match.group(2))
                shares.setdefault(layer, {})[expert] = sum(values.values()) / len(values)
        layers = sorted(shares)
        width = max((max(shares[layer]) + 1 for layer in layers), default=0)
        return layers, [[shares[layer].get(e, math.nan) for e in range(width)] for layer in layers]


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every line of a metrics.jsonl-format file, each an object with an
    integer "step"."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}: line {number}: not JSON ({e.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise PlotError(f"{path}: line {number}: expected an object with an integer 'step'")
        out.append((number, record))
    return out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def add_records(run: RunMetrics, path: Path, newest_length: dict[int, tuple[int, float]],
                newest_passkey: dict[int, tuple[int, dict[str, float]]]) -> None:
    """The file's scalars into run.series; its long-context records into newest_length
    (seq_length -> (step, perplexity)) and newest_passkey (seq_length -> (step, {depth:
    accuracy})), the newest step kept."""
    for number, record in read_records(path):
        step = record["step"]
        if "report" in record:
            if record["report"] == LONG_CONTEXT:
                length, value = record.get("seq_length"), record.get("perplexity")
                if not isinstance(length, int) or not _number(value):
                    raise PlotError(f"{path}: line {number}: a long_context record needs an integer "
                                    f"'seq_length' and a number 'perplexity'")
                if length not in newest_length or newest_length[length][0] <= step:
                    newest_length[length] = (step, float(value))
                passkey = record.get("passkey")
                if passkey is not None:
                    if not isinstance(passkey, dict) or not all(_number(v) for v in passkey.values()):
                        raise PlotError(f"{path}: line {number}: 'passkey' must map depths to accuracies")
                    if length not in newest_passkey or newest_passkey[length][0] <= step:
                        newest_passkey[length] = (step, {str(d): float(v) for d, v in passkey.items()})
            continue
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            if not _number(value):
                raise PlotError(f"{path}: line {number}: '{key}' must be a number, got {value!r}")
            run.series.setdefault(key, {})[step] = float(value)


def read_run(run_dir: str | Path) -> RunMetrics:
    path = Path(run_dir)
    metrics = path / METRICS
    if not metrics.is_file():
        raise PlotError(f"{path}: no {METRICS} there (a run's train.save_dir holds it)")
    run = RunMetrics(path=path)
    newest_length: dict[int, tuple[int, float]] = {}
    newest_passkey: dict[int, tuple[int, dict[str, float]]] = {}
    for results in [metrics, *sorted(path.glob(EVAL_RESULTS))]:
        add_records(run, results, newest_length, newest_passkey)
    run.perplexity_by_length = sorted((n, value) for n, (_, value) in newest_length.items())
    for n, (_, accuracies) in sorted(newest_passkey.items()):
        for depth, accuracy in accuracies.items():
            run.passkey_by_length.setdefault(depth, []).append((n, accuracy))
    return run


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name, or its last two parts where names repeat."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
