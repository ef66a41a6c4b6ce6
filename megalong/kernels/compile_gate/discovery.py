"""Find every Triton kernel megalong defines, by import and introspection, and check that the shape
table reaches each: launched itself, or called (at any depth) from a launched kernel's body."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from typing import Any

GATE_PACKAGE = "megalong.kernels.compile_gate"


def is_kernel(obj: Any) -> bool:
    """A @triton.jit function (a JITFunction; an InterpretedFunction under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


def kernel_name(kernel: Any) -> str:
    fn = kernel.fn
    return f"{fn.__module__}.{fn.__name__}"


def discover(package: str = "megalong.kernels", exclude: tuple[str, ...] = (GATE_PACKAGE,)) -> dict[str, Any]:
    """{module.name: kernel} for every kernel defined (not merely imported) in `package`'s modules
    (or in `package` itself when it is a plain module)."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{package}."):
        if any(info.name == e or info.name.startswith(e + ".") for e in exclude):
            continue
        modules.append(importlib.import_module(info.name))
    found = {}
    for module in modules:
        for obj in vars(module).values():
            if is_kernel(obj) and obj.fn.__module__ == module.__name__:
                found[kernel_name(obj)] = obj
    return found


def _resolve(node: ast.expr, scope: dict[str, Any]) -> Any:
    """The object a call's callee names (`f`, `module.f`), or None."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, scope)
        return getattr(owner, node.attr, None) if owner is not None else None
    return None


def callees(kernel: Any) -> list[Any]:
    """The kernels this kernel's body calls (resolved through its module's globals)."""
    fn = kernel.fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    scope = fn.__globals__
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = _resolve(node.func, scope)
            if target is not None and is_kernel(target):
                found.append(target)
    return found


def unreached(kernels: dict[str, Any], launched: set[str]) -> list[str]:
    """A failure line for every kernel neither launched nor called from a launched kernel."""
    reached, todo = set(), [k for k in kernels if k in launched]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        if name in kernels:
            todo.extend(kernel_name(c) for c in callees(kernels[name]))
    return [f"kernel {name} is never launched by the shape table (nor called from a launched kernel)"
            for name in sorted(kernels) if name not in reached]
