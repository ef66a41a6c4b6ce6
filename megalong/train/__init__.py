"""Training: one loop (loop.py) over an `Engine` (engine.py) — plain torch with pipeline schedules
(torch_engine.py), megatron-core DDP and its distributed optimizer (megatron_engine.py,
megatron_dp.py), DeepSpeed ZeRO (deepspeed_engine.py, deepspeed_checkpoint.py), chosen by
engines.py — and what the loop uses: losses, pipeline, optimizer, schedule, batches, metrics and
run_log (the log), nonfinite. Checkpoints: megalong/checkpoint/."""
