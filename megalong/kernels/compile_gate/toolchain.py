"""Triton's bundled CUDA tools (ptxas, cuobjdump), and what the gate reads from their output."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TC_OP = re.compile(r"\b(HGMMA|HMMA)\.")


@dataclass(frozen=True)
class PtxasUsage:
    registers: int
    spill_stores: int
    spill_loads: int


def tool_path(name: str) -> str:
    """ptxas or cuobjdump from `triton/backends/nvidia/bin` (triton's knobs know where)."""
    from triton import knobs

    path = getattr(knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"compile gate: triton's {name} not found (looked at {path})")
    return path


def sm_name(arch: int) -> str:
    """ptxas' --gpu-name for a compute capability, as Triton names it (sm_90a on Hopper)."""
    return f"sm_{arch}a" if arch == 90 else f"sm_{arch}"


def parse_ptxas_log(log: str) -> PtxasUsage:
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"compile gate: no register/spill figures in the ptxas log:\n{log}")
    return PtxasUsage(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)))


def ptxas_usage(ptx: str, arch: int) -> PtxasUsage:
    """`ptxas -v` on the PTX with the flags Triton compiles it with (-lineinfo, the same sm)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool_path("ptxas"), "-lineinfo", "-v", f"--gpu-name={sm_name(arch)}",
                               src, "-o", out], check=False, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
    return parse_ptxas_log(done.stderr)


def sass(cubin: bytes) -> str:
    """The cubin's SASS (`cuobjdump -sass`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool_path("cuobjdump"), "-sass", path], check=False, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cuobjdump failed: {done.stderr.strip()}")
    return done.stdout


def tensor_core_ops(sass_text: str) -> set[str]:
    """{'HGMMA', 'HMMA'}: which tensor-core instruction families the SASS uses."""
    return set(_TC_OP.findall(sass_text))
