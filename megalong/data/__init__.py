"""Corpus streaming, tokenizer training, preprocessing to megatron .bin/.idx, GPT datasets."""
