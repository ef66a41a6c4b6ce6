"""Sparsely gated mixture of experts in the MLP slot of megatron-core's TransformerLayer."""
