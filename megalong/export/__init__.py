"""Export of megalong checkpoints to Hugging Face folders."""
