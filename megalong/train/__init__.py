"""Training: loop, optimizer, schedule, checkpoints, metrics."""
