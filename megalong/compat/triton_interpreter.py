"""Under TRITON_INTERPRET=1 (CPU tests), make triton 3.6's interpreter run loops with tensor bounds.

The interpreter turns a scalar into a Python int with `int(array_of_shape_1)`, which numpy >= 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"), so `range(lo, hi)` with
bounds computed in the kernel fails there while it compiles fine for the GPU. This patch makes
`__index__` take the single element.

The interpreter also keeps bfloat16 tensors as their raw uint16 bits and hands those to
`np.matmul` in `tl.dot`, so a bf16 `tl.dot` returns garbage. The patch widens bf16 operands to
float32 first (exact: a bf16 product fits a float32), which is what the GPU's bf16 tensor-core dot
with a float32 accumulator computes. And its float32 -> bf16 cast truncates, where the GPU
(`cvt.rn.bf16.f32`) rounds to nearest even; the patch rounds. It only touches triton's interpreter
and only when that is on (`TRITON_INTERPRET=1`, read when the patch is applied: by
megalong/kernels/__init__.py, so before any kernel runs).

Private triton 3.6.0 API touched: `triton.runtime.interpreter._patch_lang_tensor`,
`_convert_float`, `TensorHandle`, `InterpreterBuilder.create_dot` and `.cast_impl`.
"""
from __future__ import annotations

import os


def patch_interpreter() -> bool:
    """Apply the patch when the interpreter is on (idempotent); returns whether it is applied."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_megalong", False):
        return True

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._megalong = True
    interpreter._patch_lang_tensor = patched

    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original_cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        nan = np.isnan(src.data)
        out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
        return interpreter.TensorHandle(out.reshape(src.data.shape), tl.bfloat16)

    builder.cast_impl = cast_impl
    return True
