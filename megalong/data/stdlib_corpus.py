"""The embedded default corpus: the Python standard library's own documentation.

Every Python install carries several MB of English prose about programming in its modules'
docstrings. Each top-level module becomes one document: its `pydoc` plain-text page (module,
class and function documentation) without the lines that name paths on this machine. Modules
are imported in a child process so that nothing they do on import touches the caller.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megalong.data.corpus import write_jsonl_zst

PILE_SET_NAME = "PythonStdlibDocs"
# Modules that open windows or browsers, print on import, or only exist on other platforms.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
        "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "nt", "venv", "xxlimited",
        "xxlimited_35", "xxsubtype"}

_CHILD = r"""
import json, pydoc, sys, warnings, io, contextlib
warnings.filterwarnings("ignore")
skip = set(json.loads(sys.argv[1]))
for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skip):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = __import__(name)
            page = pydoc.render_doc(module, renderer=pydoc.plaintext)
    except BaseException:
        continue
    print(json.dumps({"name": name, "text": page}), flush=True)
"""


@dataclass
class CorpusStats:
    path: str
    documents: int
    megabytes: float

    def __str__(self) -> str:
        return f"{self.documents} documents, {self.megabytes:.1f} MB of text in {self.path}"


def _strip_machine_paths(page: str) -> str:
    """Drop the FILE and MODULE REFERENCE sections (paths and URLs of this install)."""
    out, skipping = [], False
    for line in page.splitlines():
        if line in ("FILE", "MODULE REFERENCE", "DATA", "VERSION", "AUTHOR"):
            skipping = line in ("FILE", "MODULE REFERENCE")
        elif line and not line.startswith(" ") and line.isupper():
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def stdlib_documents(max_docs: Optional[int] = None) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(sorted(SKIP))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    count = 0
    try:
        for line in proc.stdout:
            yield _strip_machine_paths(json.loads(line)["text"])
            count += 1
            if max_docs is not None and count >= max_docs:
                break
    finally:
        proc.kill()
        proc.wait()


def build_stdlib_corpus(out_path: str | Path, max_docs: Optional[int] = None,
                        max_mb: Optional[float] = None) -> CorpusStats:
    """Write the standard library's documentation as Pile-format `.jsonl.zst`."""
    total = 0

    def bounded() -> Iterator[str]:
        nonlocal total
        for text in stdlib_documents(max_docs):
            if max_mb is not None and total >= max_mb * 1e6:
                return
            total += len(text.encode("utf-8"))
            yield text

    count = write_jsonl_zst(out_path, bounded(), PILE_SET_NAME)
    return CorpusStats(str(out_path), count, total / 1e6)
