"""Record the Triton launches megalong's launchers make, instead of running them.

Inside `record_launches(arch)`, `JITFunction.run` (what `kernel[grid](...)` calls) binds the
arguments with Triton's own binder for a CUDA target of that arch, so every argument gets the type
and specialization the real launch would get (int 1 becomes a constexpr, an int past 2^31 is i64,
pointers and ints divisible by 16 get `tt.divisibility`), and appends a `Launch` to the list it
yields; nothing runs (also under TRITON_INTERPRET=1, the CPU tests). Launchers are driven on `meta` tensors (no memory, any size) inside
`megalong.kernels.arch.target_arch(arch)`, which the block also enters, so they pick the tiles
they would pick on that GPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from megalong.kernels.arch import target_arch


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it (no grid, no tensors)."""
    module: str
    name: str
    signature: tuple[tuple[str, str], ...]  # (argument, triton type or 'constexpr'), in order
    constexprs: tuple[tuple[str, Any], ...]  # (argument, value)
    divisible: tuple[str, ...]  # arguments specialized as divisible by 16
    num_warps: int
    num_stages: int
    case: str = ""  # the shape-table case that made it (not part of `key`)

    @property
    def kernel(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def key(self) -> tuple:
        """Launches with equal keys are compiled once: kernel, argument types, constexprs, which
        pointers are 16-byte aligned, warps, stages. Whether a scalar int is divisible by 16 is
        left out: it only lets Triton assume alignment in that int's address arithmetic, and it is
        what sets apart shapes that differ only in their number of heads (16 vs 12 or 20), which
        would double the compile time for the same tiles."""
        types = dict(self.signature)
        pointers = tuple(a for a in self.divisible if types[a].startswith("*"))
        return (self.module, self.name, self.signature, tuple((k, repr(v)) for k, v in self.constexprs),
                pointers, self.num_warps, self.num_stages)

    def settings(self) -> str:
        """The constexprs and launch options, short (for report lines)."""
        parts = [f"{k}={v}" for k, v in self.constexprs]
        wide = [k for k, t in self.signature if t == "i64"]
        if wide:
            parts.append("i64:" + "/".join(wide))
        return " ".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])


class _Recorder:
    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend

        self.backend = CUDABackend(GPUTarget("cuda", arch, 32))
        self.binders: dict[int, Any] = {}
        self.launches: list[Launch] = []
        self.case = ""

    def record(self, fn: Any, args: tuple, kwargs: dict) -> None:
        from triton.runtime.jit import JITFunction, create_function_from_signature

        binder = self.binders.get(id(fn))
        if binder is None:
            # Under TRITON_INTERPRET=1 kernels are InterpretedFunctions, which keep no parameter
            # list: a JITFunction of the same Python function supplies it (nothing is compiled).
            jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)
            binder = self.binders[id(fn)] = create_function_from_signature(jit.signature, jit.params,
                                                                           self.backend)
        params, specialization, _ = binder(*args, **kwargs)
        options = self.backend.parse_options({k: v for k, v in kwargs.items() if k not in params})
        names = list(params)
        signature, constexprs, divisible = [], [], []
        for name, (kind, attr) in zip(names, specialization):
            if isinstance(kind, tuple) or kind.startswith("["):
                raise TypeError(f"compile gate: {fn.fn.__name__}({name}) is a tuple argument; the recorder "
                                "handles scalars and pointers only")
            signature.append((name, kind))
            if kind == "constexpr":
                constexprs.append((name, params[name]))
            elif isinstance(attr, str) and self.backend.parse_attr(attr):
                divisible.append(name)
        self.launches.append(Launch(fn.fn.__module__, fn.fn.__name__, tuple(signature), tuple(constexprs),
                                    tuple(divisible), options.num_warps, options.num_stages, self.case))


@contextlib.contextmanager
def record_launches(arch: int) -> Iterator[_Recorder]:
    """Within the block, kernel launches are recorded on the yielded recorder (`.launches`;
    set `.case` to label them), not run; launchers tune for sm_`arch`."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    recorder = _Recorder(arch)
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        recorder.record(self, args, kwargs)

    for cls in originals:
        cls.run = run
    try:
        with target_arch(arch):
            yield recorder
    finally:
        for cls, original in originals.items():
            cls.run = original
