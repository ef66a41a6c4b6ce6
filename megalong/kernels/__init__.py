"""Tensor operations only: Triton kernels, each beside the torch reference it must equal, their launchers,
and `select` (which path runs). The modules that use a kernel hold their own glue; nothing here imports them."""
from megalong.compat.triton_interpreter import patch_interpreter

patch_interpreter()  # under TRITON_INTERPRET=1 (CPU tests) only: megalong/compat/triton_interpreter.py
