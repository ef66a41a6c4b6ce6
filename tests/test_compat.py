"""megalong/compat: the library versions its patches were written for are setup.py's pins and are
the ones installed, every private attribute a patch replaces or reads exists, and nothing sets
an environment variable or patches a library at import."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPO
from megalong.compat import PATCHED, PINS


def _setup_requirements() -> dict[str, str]:
    """name -> specifier of every requirement string in setup.py (install_requires and extras)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            for name in PINS:
                if text.startswith(name) and text[len(name):len(name) + 1] in "=<>!~":
                    found.setdefault(name, set()).add(text[len(name):])
    return {name: specs for name, specs in found.items()}


def test_pins_are_setup_py_pins():
    requirements = _setup_requirements()
    for name, spec in PINS.items():
        assert spec in requirements.get(name, set()), (name, spec, requirements.get(name))


@pytest.mark.parametrize("name", sorted(PINS))
def test_installed_version_is_the_pinned_one(name):
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed (an optional extra)")
    local = Version(installed).public  # 2.13.0+cpu -> 2.13.0
    assert Version(local) in SpecifierSet(PINS[name]), f"{name} {installed} is not {PINS[name]}"


def _resolve(module: str, path: str):
    value = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("distribution,module,path", PATCHED, ids=lambda x: str(x))
def test_every_patched_attribute_exists(distribution, module, path, monkeypatch):
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{distribution} is not installed")
    if distribution == "deepspeed":
        monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    _resolve(module, path)  # AttributeError names what moved


IMPORT_IS_INERT = """
import os, sys
before = dict(os.environ)
import megalong.compat, megalong.compat.deepspeed_cpu, megalong.kernels
import megalong.train.deepspeed_engine, megalong.train.loop, megalong.model.gpt  # DS_ACCELERATOR was set here once
from megatron.core.tensor_parallel import layers, random
import torch
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert not getattr(layers.LinearWithFrozenWeight, "_megalong_cpu_autocast", False)
assert random._get_all_rng_states.__module__ == "megatron.core.tensor_parallel.random"
assert not megalong.compat.cuda_on_cpu.is_enabled()
megalong.compat.install()
assert dict(os.environ) == before
assert layers.LinearWithFrozenWeight._megalong_cpu_autocast is not torch.cuda.is_available()
assert random._get_all_rng_states.__module__ == "megalong.compat.megatron_cpu"
assert not megalong.compat.cuda_on_cpu.is_enabled()
megalong.compat.install(cuda_on_cpu=True)
assert megalong.compat.cuda_on_cpu.is_enabled()
print("ok")
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU patches are inert with CUDA")
def test_import_patches_nothing_and_install_does():
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO)
    env["TRITON_INTERPRET"] = "0"
    proc = subprocess.run([sys.executable, "-c", IMPORT_IS_INERT], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


def test_triton_interpreter_patch_follows_triton_interpret(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    from megalong.compat import patch_interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not patch_interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert patch_interpreter() and patch_interpreter()  # idempotent
    assert getattr(interpreter._patch_lang_tensor, "_megalong", False)
