"""The code rules CI enforces beyond the tests: ruff over the code and tests (rules in
pyproject.toml), mypy over the typed packages (config/ and attention/, listed in pyproject.toml),
and the layout rules of the issue tracker: no module over 400 lines, no import of another module's
private names, no import cycle between megalong's modules, and megalong/kernels/ made of tensor
operations only (it imports none of the modules that use the kernels)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megalong"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)


def test_ruff_passes():
    result = _run("ruff", "check", "megalong", "tests", "bench", "tools")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_config_and_attention():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_modules_are_short_and_import_no_private_names():
    modules = _modules()
    long_files, private = [], []
    for module, path in modules.items():
        source = path.read_text()
        if source.count("\n") > 400:
            long_files.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                target = _imported(module, path, node)
                for alias in node.names:
                    name = alias.name
                    if (target.startswith("megalong") and name.startswith("_") and not name.startswith("__")
                            and f"{target}.{name}" not in modules):
                        private.append(f"{path.relative_to(ROOT)}: from {target} import {name}")
    assert not long_files, long_files
    assert not private, private


def test_no_import_cycle_at_module_level():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                target = _imported(module, path, node)
                targets = [t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            edges[module].update(t for t in targets if t != module)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for nxt in edges[current]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert not cycles, cycles


# megalong/kernels/ holds the kernels, their tensor launchers and the selection (select.py); each
# module's glue around its kernel lives with the module (megalong/attention/*, megalong/moe/*).
KERNELS_MUST_NOT_IMPORT = ("megalong.attention", "megalong.moe", "megalong.model", "megalong.train")


def test_kernels_import_no_module_that_uses_them():
    bad = []
    for module, path in _modules().items():
        if not module.startswith("megalong.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # also the imports inside functions
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                target = _imported(module, path, node)
                targets = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if any(target == f or target.startswith(f + ".") for f in KERNELS_MUST_NOT_IMPORT):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {target}")
    assert not bad, bad
