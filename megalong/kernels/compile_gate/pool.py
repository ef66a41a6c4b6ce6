"""Compile many launches in spawned processes that import Triton without TRITON_INTERPRET.

A process that imported Triton under TRITON_INTERPRET=1 (the CPU tests) holds interpreter objects
for every @triton.jit function, Triton's own `tl.sum` and friends included, and cannot compile for
a GPU. The workers are started with the variable removed from the environment they inherit
(importing `megalong.kernels` imports Triton at once when it is set) and find each kernel again by
module and name.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CompileTask:
    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    arch: int
    num_warps: int
    num_stages: int
    divisible: tuple[str, ...] = ()  # arguments known divisible by 16 (tt.divisibility)


def _init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def run_task(task: CompileTask) -> Any:
    """Compile one task here (a clean process); returns its CompileReport."""
    from megalong.kernels.compile_gate.aot import compile_report

    start = time.perf_counter()
    kernel = getattr(importlib.import_module(task.module), task.name)
    names = list(kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in task.divisible}
    report = compile_report(kernel, dict(task.signature), dict(task.constexprs), task.arch,
                            task.num_warps, task.num_stages, attrs)
    report.kernel = f"{task.module}.{task.name}"
    report.seconds = time.perf_counter() - start
    return report


def compile_many(tasks: list[CompileTask], jobs: int = 2,
                 on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """CompileReports of `tasks`, in order, from `jobs` spawned workers sharing a Triton cache that
    lives for this call only (nothing compiled is kept between runs). `on_done(i, report)` is called
    as each task finishes (in completion order)."""
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # inherited by the workers at their start
    try:
        return _compile_many(tasks, jobs, on_done)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _compile_many(tasks: list[CompileTask], jobs: int,
                  on_done: Callable[[int, Any], None] | None) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="megalong-compile-gate-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(tasks) or 1)),
                                                    mp_context=ctx, initializer=_init,
                                                    initargs=(cache,)) as pool:
            futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
            reports: list[Any] = [None] * len(tasks)
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                reports[i] = future.result()
                if on_done is not None:
                    on_done(i, reports[i])
            return reports
