"""What training reports: loss, learning rate, grad norm, tokens/s, MFU, memory, ETA."""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from megalong.paths import writing

log = logging.getLogger("megalong")


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Throughput:
    tokens_per_step: int
    flops_per_token: float
    peak_flops_total: float  # all devices together
    _window_start: float = field(default_factory=time.perf_counter)
    _window_steps: int = 0
    _all_start: float = field(default_factory=time.perf_counter)
    _all_steps: int = 0

    def step_done(self) -> None:
        self._window_steps += 1
        self._all_steps += 1

    def window(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        tokens_per_s = self._window_steps * self.tokens_per_step / elapsed
        self._window_start, self._window_steps = now, 0
        return tokens_per_s, tokens_per_s * self.flops_per_token / self.peak_flops_total

    def eta(self, steps_left: int) -> float:
        if not self._all_steps:
            return 0.0
        return (time.perf_counter() - self._all_start) / self._all_steps * steps_left


class MetricSink(Protocol):
    """Another destination of every scalar the run logs (W&B: megalong/train/wandb_log.py)."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def checkpoint_meta(self) -> dict[str, str]:
        """meta.json entries of each checkpoint (what a resumed run needs to continue)."""
        ...

    def close(self) -> None: ...


class Reporter:
    """Log lines (rank 0), an optional progress bar, `metrics.jsonl`, optional TensorBoard
    scalars and other sinks (W&B)."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool, progress_bar: bool,
                 tensorboard_dir: Optional[str], metrics_file: Optional[str] = None,
                 sinks: Sequence[MetricSink] = ()):
        self.enabled = enabled
        self.metrics_file = metrics_file if enabled else None
        self.sinks = list(sinks) if enabled else []
        self.bar = None
        self.tb = None
        if enabled and progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def advance(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One line of metrics.jsonl (NaN and inf written as null: strict JSON has neither)."""
        if self.metrics_file is not None:
            finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
            with writing(self.metrics_file), open(self.metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **finite}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.log(step, values)

    def checkpoint_meta(self) -> dict[str, str]:
        return {k: v for sink in self.sinks for k, v in sink.checkpoint_meta().items()}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()
