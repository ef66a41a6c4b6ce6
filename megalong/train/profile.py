"""`train.profile: {start_step, steps, dir}`: a torch profiler trace of a few training steps.

Each process writes one trace through torch's TensorBoard handler (`<dir>/rank<R>.<id>.pt.trace.json`:
`tensorboard --logdir <dir>` with the torch-tb-profiler plugin reads it, and it is a Chrome trace,
so chrome://tracing and Perfetto open it too). Only the optimizer steps are recorded, not the log
lines, evaluations or checkpoints between them. When the last profiled step ends, the log gets
one line: the operators with the most self time on the device (the GPU, else the CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megalong.config import Config

TOP_OPERATORS = 5


def profile_dir(cfg: Config) -> Path:
    p = cfg.train.profile
    return Path(p.dir) if p.dir else Path(cfg.train.save_dir or ".") / "profile"


def top_operators(averages, on_device: bool, n: int = TOP_OPERATORS) -> tuple[float, list[tuple[str, float]]]:
    """(total self time in seconds, [(operator, share of the total)] of the n largest) over the
    profiler's `key_averages()`."""
    def self_time(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    events = [e for e in averages if self_time(e) > 0]
    total = sum(self_time(e) for e in events)
    ranked = sorted(events, key=self_time, reverse=True)[:n]
    return total / 1e6, [(e.key, self_time(e) / total) for e in ranked]


class StepProfiler:
    """Starts torch.profiler before step `start_step` and stops it after `start_step + steps - 1`
    (steps numbered from 1, as the log numbers them). Does nothing when train.profile is unset or
    the run resumed past its steps."""

    def __init__(self, cfg: Config, rank: int, device: torch.device):
        p = cfg.train.profile
        self.first = p.start_step
        self.last = None if p.start_step is None else p.start_step + p.steps - 1
        self.dir, self.rank, self.device = profile_dir(cfg), rank, device
        self.profiler: Optional[torch.profiler.profile] = None
        self.profiled: list[int] = []

    def step_begins(self, step: int) -> None:
        if self.first is None or self.last is None or not self.first <= step <= self.last:
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.dir.mkdir(parents=True, exist_ok=True)
            handler = torch.profiler.tensorboard_trace_handler(str(self.dir), worker_name=f"rank{self.rank}")
            self.profiler = torch.profiler.profile(activities=activities, on_trace_ready=handler)
            self.profiler.start()
        self.profiled.append(step)

    def step_ends(self, step: int) -> Optional[str]:
        """The summary line once the last profiled step is done (or None)."""
        return self.finish() if step == self.last else None

    def finish(self) -> Optional[str]:
        """Stop and write the trace (also when the run ends before the last profiled step)."""
        if self.profiler is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler, self.profiler = self.profiler, None
        profiler.stop()  # writes the trace through the handler
        on_device = self.device.type == "cuda"
        total, top = top_operators(profiler.key_averages(), on_device)
        traces = sorted(self.dir.glob(f"rank{self.rank}.*.pt.trace.json"), key=lambda f: f.stat().st_mtime)
        steps = f"{self.profiled[0]}-{self.profiled[-1]}" if len(self.profiled) > 1 else str(self.profiled[0])
        ops = ", ".join(f"{name if len(name) <= 48 else name[:45] + '...'} {100 * share:.1f}%" for name, share in top)
        return (f"profile of steps {steps}: {total:.3f} s of operator self time on the "
                f"{'GPU' if on_device else 'CPU'} (rank {self.rank}); top operators: {ops}; "
                f"trace {traces[-1] if traces else self.dir}")
