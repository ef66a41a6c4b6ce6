"""Under TRITON_INTERPRET=1 (CPU tests), make triton 3.6's interpreter run loops with tensor bounds.

The interpreter turns a scalar into a Python int with `int(array_of_shape_1)`, which numpy >= 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"), so `range(lo, hi)` with
bounds computed in the kernel fails there while it compiles fine for the GPU. This patch makes
`__index__` take the single element. It only touches triton's interpreter and only when that is on.
"""
from __future__ import annotations

import os


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_megalong", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._megalong = True
    interpreter._patch_lang_tensor = patched


patch_interpreter()
