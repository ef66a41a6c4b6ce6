"""Triton kernels, each beside the torch reference it must equal; `select` decides which runs."""
from megalong.compat.triton_interpreter import patch_interpreter

patch_interpreter()  # under TRITON_INTERPRET=1 (CPU tests) only: megalong/compat/triton_interpreter.py
