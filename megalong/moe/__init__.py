"""Sparsely gated mixture of experts in the MLP slot of megatron-core's TransformerLayer. The router's
top-k gating and the layer's experts run on Triton kernels from here when `kernels.select` says so."""
