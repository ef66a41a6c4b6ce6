"""Compile one launch ahead of time for a CUDA target (no GPU needed) and check what it uses.

`compile_report(kernel, signature, constexprs, arch, num_warps, num_stages)` runs
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, reads registers and spills
from ptxas' -v log, shared memory from the compiled metadata, the tensor-core instructions from the
SASS (`cuobjdump -sass`), and returns a `CompileReport` whose `problems` say why it fails (empty:
it passes). A kernel that does not compile is a report with its error, not an exception.
Called where Triton runs as the interpreter (TRITON_INTERPRET=1, the CPU tests), it compiles in a
clean spawned process (`pool.compile_many`), which finds the kernel again by module and name.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from typing import Any

from megalong.kernels.compile_gate import limits, toolchain

_DOT_RESULT = re.compile(r"tt\.dot\b[^\n]*->\s*tensor<(\d+)x(\d+)x")


@dataclass
class CompileReport:
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    shared_limit: int = 0
    dot_rows: list[int] = field(default_factory=list)  # result rows of every tt.dot
    tensor_cores: list[str] = field(default_factory=list)  # 'HGMMA' / 'HMMA' found in the SASS
    error: str = ""  # the compile error, first line(s)
    seconds: float = 0.0  # wall time of the compile and the inspection
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def dot_result_rows(ttir: str) -> list[int]:
    """Rows (M) of the result of every `tt.dot` in the TTIR (helpers are inlined there)."""
    return [int(m) for m, _ in _DOT_RESULT.findall(ttir)]


def _short(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = " | ".join(lines[-3:]) if lines else type(error).__name__
    return f"{type(error).__name__}: {text}"[:400]


def _compile(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any],
             attrs: dict | None, arch: int, options: dict[str, Any]) -> tuple[Any, str]:
    """(the compiled kernel, ptxas' -v log as Triton ran it; '' if it did not print one)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: read it there
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    return compiled, log.getvalue()


def compile_report(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int,
                   num_warps: int = 4, num_stages: int = 3, attrs: dict | None = None,
                   options: dict[str, Any] | None = None) -> CompileReport:
    """Compile `kernel` (a triton.JITFunction) for sm_`arch` and check it (see the module docstring).

    signature: every argument's triton type ('*bf16', 'i32', 'fp32', ..., 'constexpr');
    constexprs: the constexpr arguments' values by name; attrs: ASTSource attributes, e.g.
    {(0,): [['tt.divisibility', 16]]}; options: further compile options (e.g. maxnreg)."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    if knobs.runtime.interpret or not isinstance(kernel, JITFunction):
        # Triton was imported for the interpreter here (TRITON_INTERPRET=1): compile in a clean process.
        from megalong.kernels.compile_gate.pool import CompileTask, compile_many

        divisible = tuple(kernel.arg_names[i] for (i,), a in (attrs or {}).items() if a)
        if options:
            raise ValueError("compile_report: extra options need a process without TRITON_INTERPRET")
        task = CompileTask(kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()),
                           tuple(constexprs.items()), arch, num_warps, num_stages, divisible)
        return compile_many([task], jobs=1)[0]
    name = getattr(kernel, "__name__", str(kernel))
    report = CompileReport(name, arch, num_warps, num_stages, shared_limit=limits.shared_limit(arch))
    opts = dict(options or {}, num_warps=num_warps, num_stages=num_stages)
    try:
        compiled, log = _compile(kernel, signature, constexprs, attrs, arch, opts)
    except Exception as error:  # noqa: BLE001  any compiler failure is a finding, not a crash of the gate
        report.error = _short(error)
        report.problems.append(f"does not compile: {report.error}")
        return report
    try:
        usage = (toolchain.parse_ptxas_log(log) if "Used" in log
                 else toolchain.ptxas_usage(compiled.asm["ptx"], arch))
        ops = toolchain.tensor_core_ops(toolchain.sass(compiled.asm["cubin"]))
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        report.error = _short(error)
        report.problems.append(f"cannot inspect the binary: {report.error}")
        return report
    report.registers, report.spill_stores, report.spill_loads = (usage.registers, usage.spill_stores,
                                                                 usage.spill_loads)
    report.shared = int(compiled.metadata.shared)
    report.dot_rows = dot_result_rows(compiled.asm["ttir"])
    report.tensor_cores = sorted(ops)
    if report.shared > report.shared_limit:
        report.problems.append(f"shared memory {report.shared} > {report.shared_limit} bytes (sm_{arch})")
    if usage.spill_stores or usage.spill_loads:
        report.problems.append(f"spills registers ({usage.spill_stores} bytes stored, "
                               f"{usage.spill_loads} loaded per thread)")
    tc = limits.tensor_core_problem(arch, report.dot_rows, num_warps, ops)
    if tc:
        report.problems.append(tc)
    return report
