"""Export of megalong checkpoints to Hugging Face folders: hf.py (`megalong export`), gpt_neo.py
and mixtral.py (exact mappings to transformers' classes), tokenizer.py (SentencePiece ->
tokenizer.json), and megalong's own MegalongForCausalLM: modeling.py, hf_attention.py, hf_layers.py."""
