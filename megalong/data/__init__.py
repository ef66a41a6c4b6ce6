"""Data: corpus.py (streaming .jsonl/.jsonl.zst), tokenizer.py (the tokenizer objects) and
tokenizer_training.py, long_documents.py (bounded-memory encoding), preprocess.py (.jsonl ->
megatron .bin/.idx, with preprocess_options.py, preprocess_events.py, preprocess_worker.py,
preprocess_shards.py), indexed.py (.bin/.idx read, write, merge), inspect.py, datasets.py and
splits.py (megatron-core GPT datasets), index_cache.py, stdlib_corpus.py (the demo's corpus)."""
