"""The gate: record the shape table's launches for each arch, compile every distinct one in a
process pool, check them, and check that every discovered kernel is reached."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from megalong.kernels.compile_gate.aot import CompileReport
from megalong.kernels.compile_gate.discovery import discover, unreached
from megalong.kernels.compile_gate.pool import CompileTask, compile_many
from megalong.kernels.compile_gate.recorder import Launch, record_launches
from megalong.kernels.compile_gate.shapes import all_cases

ARCHS = (90, 80)


@dataclass
class Result:
    launch: Launch
    cases: list[str]
    report: CompileReport

    def line(self) -> str:
        r = self.report
        tc = "+".join(r.tensor_cores) or ("none" if r.dot_rows else "-")
        status = "OK" if r.ok else "FAIL: " + "; ".join(r.problems)
        figures = (f"regs {r.registers:3d} spill {r.spill_stores}/{r.spill_loads} shared {r.shared:6d} tc {tc}"
                   if not r.error else "")
        more = f" (+{len(self.cases) - 1})" if len(self.cases) > 1 else ""
        return (f"sm_{r.arch} {self.launch.name} [{self.launch.settings()}] {figures} {status}"
                f"  <- {self.cases[0]}{more}")


@dataclass
class GateRun:
    results: list[Result] = field(default_factory=list)
    discovery_failures: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [r.line() for r in self.results if not r.report.ok] + self.discovery_failures

    def summary(self) -> str:
        lines = []
        for arch in sorted({r.report.arch for r in self.results}, reverse=True):
            mine = [r for r in self.results if r.report.arch == arch]
            bad = [r for r in mine if not r.report.ok]
            lines.append(f"sm_{arch}: {len(mine)} distinct launches, {len(mine) - len(bad)} OK, {len(bad)} FAIL")
        lines += self.discovery_failures
        lines.append("compile gate: " + ("PASS" if not self.failures else f"FAIL ({len(self.failures)})"))
        return "\n".join(lines)


def record_table(arch: int, root: str) -> list[tuple[Launch, list[str]]]:
    """The distinct launches of the shape table for sm_`arch`, each with the cases that make it."""
    distinct: dict[tuple, tuple[Launch, list[str]]] = {}
    with record_launches(arch) as recorder:
        for name, case in all_cases(root):
            recorder.case = name
            case()
    for launch in recorder.launches:
        distinct.setdefault(launch.key, (launch, []))[1].append(launch.case)
    return list(distinct.values())


def run_gate(archs: tuple[int, ...] = ARCHS, jobs: int = 2, root: str = ".",
             on_result: Callable[[Result], None] | None = None, only: str | None = None) -> GateRun:
    """The whole gate; `root` holds configs/ (the shapes). `on_result` sees each launch's result
    as its compile finishes. `only` (a regular expression) keeps the launches whose kernel name or
    one of whose cases it matches, and skips the discovery check (a part cannot reach everything)."""
    tables = {arch: record_table(arch, root) for arch in archs}
    if only is not None:
        pattern = re.compile(only)
        tables = {arch: [(launch, cases) for launch, cases in table
                         if pattern.search(launch.name) or any(pattern.search(c) for c in cases)]
                  for arch, table in tables.items()}
    tasks = [CompileTask(launch.module, launch.name, launch.signature, launch.constexprs, arch,
                         launch.num_warps, launch.num_stages, launch.divisible)
             for arch in archs for launch, _ in tables[arch]]
    made = [(launch, cases) for arch in archs for launch, cases in tables[arch]]

    def done(i: int, report: CompileReport) -> None:
        if on_result is not None:
            on_result(Result(made[i][0], made[i][1], report))

    reports = compile_many(tasks, jobs, done)
    run = GateRun([Result(launch, cases, report) for (launch, cases), report in zip(made, reports)])
    if only is None:
        launched = {launch.kernel for table in tables.values() for launch, _ in table}
        run.discovery_failures = unreached(discover(), launched)
    return run
