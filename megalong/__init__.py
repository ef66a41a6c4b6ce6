"""megalong: GPT pretraining on megatron-core with per-layer plug-in attention."""
