"""Runs `megalong ...` command lines through megalong.cli.main (what `python -m megalong.cli` runs)
and records each one's exit status, stderr and any exception that would have reached the user as a
traceback. The one driver of the command-line tests (tests/test_bad_inputs.py,
tests/test_checkpoint_trust.py):

    run_case(argv)          in the calling process (pytest's): fast, monkeypatch works
    python tests/cli_cases.py CASES.json RESULTS.json   # CASES: [[arg, ...], ...]
                            several cases in one fresh process (run_cases_in_subprocess)

`error_line(result)` checks that a case failed as a user must see it: exit status 2, no traceback,
exactly one `megalong: <kind> error: ...` line, which it returns.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent


def run_case(argv: Sequence[str]) -> dict:
    """{"argv", "rc", "stderr"}; rc is None when an exception escaped main (its traceback is in
    stderr, as the user would have seen it)."""
    from megalong.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse, and what `python -m megalong.cli` exits with
            rc = e.code
        except BaseException:  # what the user would see as a traceback
            traceback.print_exc()
            rc = None
    return {"argv": list(argv), "rc": rc, "stderr": stderr.getvalue()}


def run_cases_in_subprocess(cases: list[list[str]], workdir: Path, timeout: int = 900) -> list[dict]:
    """run_case for each argv, in order, in one new Python process (nothing left from the tests'
    process: no process group, no imported state)."""
    (workdir / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(workdir / "cases.json"),
                           str(workdir / "results.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((workdir / "results.json").read_text())


def error_line(result: dict) -> str:
    """The one `megalong: ...` line of a case that must fail cleanly (asserted)."""
    err = result["stderr"]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("megalong:")]
    assert result["rc"] == 2 and len(errors) == 1, (result["argv"], result["rc"], err[-3000:])
    return errors[0]


if __name__ == "__main__":
    results = [run_case(argv) for argv in json.load(open(sys.argv[1]))]
    json.dump(results, open(sys.argv[2], "w"), indent=1)
