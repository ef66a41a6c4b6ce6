"""Attention kinds, chosen per layer by name (see registry.py). A kind with a Triton kernel calls it
from its own module (`kernels.select.use_kernels` decides); megalong/kernels holds only the tensor ops."""
