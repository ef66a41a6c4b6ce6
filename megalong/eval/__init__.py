"""Evaluation beyond held-out perplexity (megalong/evaluate.py): lm-evaluation-harness tasks over
megalong's own model at any parallel layout (model.py, harness.py), held-out loss per dataset
(per_dataset.py) and the long-context passkey report (passkey.py)."""
