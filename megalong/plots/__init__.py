"""`megalong plot`: runs.py reads a run directory (metrics.jsonl, eval results), figure.py draws
them with matplotlib (imported only when a plot is made)."""
