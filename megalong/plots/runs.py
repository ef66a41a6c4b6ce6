"""What `megalong plot` reads from a run directory (torch-free, matplotlib-free): the run's
`metrics.jsonl` (megalong/train/run_log.py writes it; a later line of the same step, from a resumed
run, replaces the earlier one) and the perplexity-by-length results `megalong eval --output` wrote
into it (`eval*.json`)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megalong.checkpoint.layout import METRICS
from megalong.errors import MegalongError

EXPERT_LOAD = re.compile(r"moe/layer(\d+)/expert(\d+)_load")
EVAL_RESULTS = "eval*.json"  # megalong eval --output FILE.json, FILE in the run directory
EVAL_KEY = "perplexity_by_length"  # the list an eval results file holds


class PlotError(MegalongError):
    """A run directory or file `megalong plot` cannot read (names the file and line)."""

    kind = "plot"


@dataclass
class RunMetrics:
    """One run's series: metric -> {step: value} (None values, NaN in the run, left out), and its
    perplexity by evaluation length: [(seq_length, perplexity)], sorted."""

    path: Path
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    perplexity_by_length: list[tuple[int, float]] = field(default_factory=list)

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


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
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
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlotError(f"{path}: line {number}: '{key}' must be a number, got {value!r}")
            series.setdefault(key, {})[step] = float(value)
    return series


def read_eval_results(path: Path) -> list[tuple[int, float]]:
    """[(seq_length, perplexity)] of one `megalong eval --output` file; [] for another JSON file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlotError(f"{path}: not a readable JSON file ({getattr(e, 'msg', None) or e})") from None
    if not isinstance(data, dict) or EVAL_KEY not in data:
        return []
    rows = data[EVAL_KEY]
    out = []
    for i, row in enumerate(rows if isinstance(rows, list) else [None]):
        length = row.get("seq_length") if isinstance(row, dict) else None
        value = row.get("perplexity") if isinstance(row, dict) else None
        if not isinstance(length, int) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PlotError(f"{path}: {EVAL_KEY}[{i}]: expected {{'seq_length': int, 'perplexity': number}}")
        out.append((length, float(value)))
    return out


def read_run(run_dir: str | Path) -> RunMetrics:
    path = Path(run_dir)
    metrics = path / METRICS
    if not metrics.is_file():
        raise PlotError(f"{path}: no {METRICS} there (a run's train.save_dir holds it)")
    run = RunMetrics(path=path, series=read_metrics(metrics))
    by_length: dict[int, float] = {}
    for results in sorted(path.glob(EVAL_RESULTS)):
        by_length.update(read_eval_results(results))
    run.perplexity_by_length = sorted(by_length.items())
    return run


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name, or its last two parts where names repeat."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
