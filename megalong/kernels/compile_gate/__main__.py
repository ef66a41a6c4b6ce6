"""python -m megalong.kernels.compile_gate [--arch 90 80] [--jobs N] [--report FILE] [--only RE] [--root DIR]

One line per distinct launch and arch (kernel, settings, registers, spills, shared memory,
tensor-core instruction, OK/FAIL), then a summary; exit status 1 on any failure. --report writes
the same as JSON (one record per launch, plus the discovery failures)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalong.kernels.compile_gate")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--report", help="write a JSON report here")
    parser.add_argument("--only", help="a regular expression: only the launches whose kernel or "
                        "case (e.g. gpt-neo-1.3b/bfloat16/linear) it matches; no discovery check")
    parser.add_argument("--root", default=None,
                        help="directory holding configs/ (default: the checkout megalong runs from)")
    args = parser.parse_args(argv)

    import megalong
    from megalong.errors import MegalongError, format_error
    from megalong.kernels.compile_gate import limits
    from megalong.kernels.compile_gate.gate import run_gate

    for arch in args.arch:
        try:
            limits.shared_limit(arch)
        except ValueError as error:
            print(format_error("usage", f"--arch: {error}"), file=sys.stderr)
            return 2
    if args.jobs < 1:
        print(format_error("usage", f"--jobs: must be >= 1, got {args.jobs}"), file=sys.stderr)
        return 2
    try:
        re.compile(args.only or "")
    except re.error as error:
        print(format_error("usage", f"--only: {error}"), file=sys.stderr)
        return 2
    root = args.root or str(Path(megalong.__file__).resolve().parents[1])
    start = time.time()
    try:
        run = run_gate(tuple(args.arch), args.jobs, root,
                       on_result=lambda result: print(result.line(), flush=True), only=args.only)
    except MegalongError as error:
        print(format_error(error.kind, error), file=sys.stderr)
        return 2
    print(run.summary())
    print(f"compile gate: {time.time() - start:.0f} s wall, {args.jobs} jobs")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"results": [{"kernel": r.launch.kernel, "settings": r.launch.settings(),
                                    "cases": r.cases, "report": dataclasses.asdict(r.report),
                                    "line": r.line()} for r in run.results],
                       "discovery_failures": run.discovery_failures,
                       "failures": run.failures}, f, indent=1)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
