"""The embedded default corpus: the Python standard library's own documentation.

Every Python install carries several MB of English prose about programming in its modules'
docstrings. Each public module and submodule becomes one document: its `pydoc` plain-text page
(module, class and function documentation), in sorted module-name order.

Modules are imported in a child Python (isolated mode, no site-packages, an empty environment, all
output of the imports sent to /dev/null, a time limit per module): nothing they do on import
touches the caller, and nothing of this machine (environment variables, paths, memory addresses)
ends up in the text, so the corpus is the same on every install of the same Python version.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megalong.data.corpus import write_jsonl_zst

PILE_SET_NAME = "PythonStdlibDocs"
# Top-level modules that open windows or browsers, print or run code on import, are tests or
# IDE internals, or only exist on other platforms.
SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "nt", "venv", "xxlimited",
    "xxlimited_35", "xxsubtype", "test",
})
# Package parts that are tests or near-identical boilerplate (one codec module per encoding).
SKIP_PARTS = frozenset({"test", "tests", "idle_test"})
NO_SUBMODULES = frozenset({"encodings"})
IMPORT_SECONDS = 20

# Runs in the child. Writes one JSON line {"name", "text"} per module to a duplicate of the original
# stdout; fd 1 and 2 point at /dev/null so that whatever an import prints goes nowhere.
_CHILD = r"""
import importlib, importlib.util, io, json, os, pkgutil, pydoc, signal, sys, warnings
out = os.fdopen(os.dup(1), "w", encoding="utf-8")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
sys.stdout = sys.stderr = io.StringIO()
warnings.filterwarnings("ignore")
skip, skip_parts, no_sub, seconds = json.loads(sys.argv[1])

def public(name):
    parts = name.split(".")
    return not any(p.startswith("_") or p in skip_parts for p in parts)

names = []
for top in sorted(sys.stdlib_module_names):
    if top in skip or not public(top):
        continue
    try:
        spec = importlib.util.find_spec(top)
    except Exception:
        continue
    if spec is None:
        continue
    names.append(top)
    if spec.submodule_search_locations and top not in no_sub:
        try:  # walk_packages imports subpackages, and passes on errors other than ImportError
            for info in pkgutil.walk_packages(spec.submodule_search_locations, top + ".",
                                              onerror=lambda name: None):
                if public(info.name):
                    names.append(info.name)
        except Exception:
            pass

def timeout(signum, frame):
    raise TimeoutError
signal.signal(signal.SIGALRM, timeout)
for name in sorted(set(names)):
    sys.stdout = sys.stderr = io.StringIO()
    signal.alarm(seconds)
    try:
        page = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    except BaseException:
        continue
    finally:
        signal.alarm(0)
    out.write(json.dumps({"name": name, "text": page}) + "\n")
    out.flush()
out.close()
os._exit(0)  # do not wait for threads or atexit handlers that some imports leave behind
"""

# pydoc sections that hold values (paths of this install, environment, constants) or metadata
# rather than documentation.
_DROP_SECTIONS = {"FILE", "MODULE REFERENCE", "DATA", "VERSION", "AUTHOR", "CREDITS", "DATE"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class CorpusStats:
    path: str
    documents: int
    megabytes: float
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.documents} documents, {self.megabytes:.1f} MB of text in {self.path} "
                f"({self.seconds:.1f} s)")


def _install_prefixes() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted((p for p in prefixes if len(p) > 1), key=len, reverse=True)


def clean_page(page: str) -> str:
    """A pydoc page without its value/metadata sections and memory addresses, valid UTF-8."""
    out, skipping = [], False
    for line in page.splitlines():
        if line and not line.startswith(" ") and line.isupper():  # a section heading
            skipping = line in _DROP_SECTIONS
        if not skipping:
            out.append(line)
    text = _ADDRESS.sub("", "\n".join(out).strip() + "\n")
    for prefix in _install_prefixes():  # default arguments such as executable='/opt/.../python'
        text = text.replace(prefix, "<prefix>")
    return text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from odd docstrings


def stdlib_documents(max_docs: Optional[int] = None) -> Iterator[str]:
    """One pydoc page per public standard-library module, in sorted module-name order."""
    arg = json.dumps([sorted(SKIP), sorted(SKIP_PARTS), sorted(NO_SUBMODULES), IMPORT_SECONDS])
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8", "TERM": "dumb", "HOME": "/nonexistent"}
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD, arg], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                            encoding="utf-8")
    count = 0
    try:
        for line in proc.stdout:
            if max_docs is not None and count >= max_docs:
                break
            yield clean_page(json.loads(line)["text"])
            count += 1
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if count == 0 and (max_docs is None or max_docs > 0):
        raise RuntimeError(f"{sys.executable}: no standard-library module could be documented")


def build_stdlib_corpus(out_path: str | Path, max_docs: Optional[int] = None,
                        max_mb: Optional[float] = None) -> CorpusStats:
    """Write the standard library's documentation as Pile-format `.jsonl.zst`.

    `max_docs` bounds the number of documents; `max_mb` stops after the document that reaches
    that many MB (10^6 bytes) of UTF-8 text.
    """
    started = time.perf_counter()
    total = 0

    def bounded() -> Iterator[str]:
        nonlocal total
        for text in stdlib_documents(max_docs):
            if max_mb is not None and total >= max_mb * 1e6:
                return
            total += len(text.encode("utf-8"))
            yield text

    count = write_jsonl_zst(out_path, bounded(), PILE_SET_NAME)
    return CorpusStats(str(out_path), count, total / 1e6, time.perf_counter() - started)
