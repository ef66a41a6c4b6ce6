"""Triton kernels, each beside the torch reference it must equal; `select` decides which runs."""
