"""Runs several `megalong ...` command lines in one process, through megalong.cli.main (what
`python -m megalong.cli` runs), and records each one's exit status, stderr and any exception that
would have reached the user as a traceback.

    python tests/cli_cases.py CASES.json RESULTS.json   # CASES: [[arg, ...], ...]
"""
import contextlib
import io
import json
import sys
import traceback

from megalong.cli import main

results = []
for argv in json.load(open(sys.argv[1])):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException:  # what the user would see as a traceback
            traceback.print_exc()
            rc = None
    results.append({"argv": argv, "rc": rc, "stderr": stderr.getvalue()})
json.dump(results, open(sys.argv[2], "w"), indent=1)
