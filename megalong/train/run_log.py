"""What a training run logs, the same for every engine: the model and data lines at the start,
one line per log interval (loss, lr, grad norm, tokens/s, MFU, memory, ETA; per MoE layer its
expert load and dropped tokens), held-out losses; `<save_dir>/metrics.jsonl`, TensorBoard and W&B
(megalong/train/wandb_log.py) get the same scalars."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from megalong.checkpoint.layout import METRICS
from megalong.checkpoint.step import read_checkpoint_info
from megalong.config import Config
from megalong.parallel.distributed import ParallelLayout
from megalong.train.metrics import Reporter, Throughput, format_duration, memory_gib
from megalong.train.pipeline import pipeline_moe_stats
from megalong.train.wandb_log import META_KEY, open_wandb, wandb_enabled


def open_reporter(cfg: Config, layout: ParallelLayout, start_step: int, end_step: int,
                  resumed_from: Optional[Path] = None) -> Reporter:
    """Progress bar, log lines, `<save_dir>/metrics.jsonl`, TensorBoard and W&B, written by rank 0;
    a run resumed from a checkpoint continues the W&B run that checkpoint names."""
    t = cfg.train
    metrics_file = None
    sinks = []
    if t.save_dir and layout.rank == 0:
        Path(t.save_dir).mkdir(parents=True, exist_ok=True)
        metrics_file = str(Path(t.save_dir) / METRICS)
    if layout.rank == 0 and wandb_enabled(cfg):
        resumed_id = read_checkpoint_info(resumed_from).meta.get(META_KEY) if resumed_from else None
        sinks.append(open_wandb(cfg, resumed_id))
    return Reporter(end_step, start_step, layout.rank == 0, t.progress_bar, t.tensorboard_dir,
                    metrics_file, sinks)


def describe_model(cfg: Config, chunks: list[torch.nn.Module], layout: ParallelLayout) -> str:
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    kinds = cfg.layer_kinds()
    summary = ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))
    return (f"model: {cfg.model.num_layers} layers ({summary}), hidden {cfg.model.hidden_size}, "
            f"{cfg.model.num_attention_heads} heads, {n_params / 1e6:.2f}M parameters on this rank; "
            f"processes: {layout.world_size} (tensor {layout.tensor_parallel} x pipeline "
            f"{layout.pipeline_parallel} x data {layout.data_parallel}) on {layout.device.type}"
            f"{'; layers torch.compiled (the first steps compile)' if cfg.execution.compile else ''}")


def describe_data(cfg: Config, train_set, valid_set, n_micro: int) -> list[str]:
    t = cfg.train
    lines = [f"data: {len(train_set)} training and {len(valid_set) if valid_set else 0} held-out "
             f"samples of {cfg.seq_length} tokens; {t.global_batch_size * cfg.seq_length} tokens per step "
             f"({n_micro} micro-batches of {t.micro_batch_size} per process)"]
    if len(cfg.data.train) > 1:
        from megalong.data.datasets import describe_blend

        lines.append(describe_blend("train", train_set))
    return lines


def report_interval(reporter: Reporter, throughput: Throughput, done: int, end_step: int, lr: float,
                    window: list[list[float]], device: torch.device) -> tuple[float, list[float]]:
    """The log line of the steps since the last one (host values [lm, aux, norm, applied] each;
    skipped steps left out); returns tokens/s and the values of the last step reported."""
    values = [v for v in window if math.isfinite(v[0])] or list(window)
    window_loss = sum(v[0] for v in values) / len(values)
    tokens_per_s, mfu = throughput.window()
    reporter.line(f"step {done}/{end_step} | loss {window_loss:.4f} | lr {lr:.3e} | "
                  f"grad norm {values[-1][2]:.3f} | {tokens_per_s:,.0f} tokens/s | "
                  f"MFU {100 * mfu:.2f}% | mem {memory_gib(device):.2f} GiB | "
                  f"ETA {format_duration(throughput.eta(end_step - done))}")
    reporter.scalars(done, {"perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu,
                            "perf/memory_gib": memory_gib(device)})
    return tokens_per_s, values[-1]


def report_moe(reporter: Reporter, step: int, model: torch.nn.Module, aux: float) -> None:
    """Per MoE layer (of every pipeline stage), of the last micro-batch on this rank (its whole
    sequences at context parallelism): expert load spread and dropped tokens (and each expert's
    share of the assignments in the metrics). Collective over the pipeline and context groups:
    every rank calls it."""
    parts, scalars = [], {"moe/aux_loss": aux}
    for layer, stats in pipeline_moe_stats(model):
        load = stats.load.float() / max(1, stats.assignments)
        cv = float(load.std() / load.mean()) if load.numel() > 1 else 0.0
        dropped = float(stats.dropped) / max(1, stats.assignments)
        parts.append(f"L{layer} load {float(load.min()):.3f}-{float(load.max()):.3f} cv {cv:.2f} "
                     f"dropped {100 * dropped:.1f}%")
        scalars.update({f"moe/layer{layer}/load_min": float(load.min()),
                        f"moe/layer{layer}/load_max": float(load.max()),
                        f"moe/layer{layer}/load_cv": cv, f"moe/layer{layer}/dropped": dropped})
        scalars.update({f"moe/layer{layer}/expert{e}_load": share for e, share in enumerate(load.tolist())})
    reporter.line(f"  moe: aux loss {aux:.4f} | " + " | ".join(parts))
    reporter.scalars(step, scalars)


def report_held_out(reporter: Reporter, step: int, loss: float, final_of: int | None = None) -> None:
    reporter.scalars(step, {"valid/loss": loss})
    if final_of is None:
        reporter.line(f"step {step}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
    else:
        reporter.line(f"held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f} after {final_of} steps")


def report_tasks(reporter: Reporter, step: int, results: dict[str, dict[str, float]]) -> None:
    """lm-evaluation-harness results: `eval/<task>/<metric>` scalars and one line per task."""
    for task, metrics in sorted(results.items()):
        reporter.scalars(step, {f"eval/{task}/{k}": v for k, v in metrics.items()})
        reporter.line(f"step {step}: {task} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


def report_held_out_per_dataset(reporter: Reporter, step: int, losses: dict[str, float]) -> None:
    """Held-out loss of each dataset of data.train: `valid/<name>/loss` and `valid/<name>/ppl`."""
    values: dict[str, float] = {}
    for name, loss in losses.items():
        values.update({f"valid/{name}/loss": loss, f"valid/{name}/ppl": math.exp(min(loss, 700.0))})
    reporter.scalars(step, values)
    reporter.line(f"step {step}: held-out loss per dataset: " + ", ".join(
        f"{name} {loss:.4f} (perplexity {math.exp(min(loss, 700.0)):.2f})" for name, loss in losses.items()))


def report_long_context(reporter: Reporter, step: int, rows: list[dict]) -> None:
    """The long-context report: per length, perplexity and passkey accuracy at each depth, as a
    table, and one `metrics.jsonl` record per length ({"step", "report": "long_context",
    "seq_length", "loss", "perplexity", "tokens", "passkey": {depth: accuracy}, "trials"})."""
    depths = sorted({d for row in rows for d in row["passkey"]}, key=float)
    reporter.line(f"{'seq_length':>10} {'perplexity':>11} " + " ".join(f"{'key@' + d:>9}" for d in depths))
    for row in rows:
        reporter.line(f"{row['seq_length']:>10} {row['perplexity']:>11.2f} "
                      + " ".join(f"{100 * row['passkey'][d]:>8.1f}%" for d in depths))
        reporter.scalars(step, {"report": "long_context", **row})
