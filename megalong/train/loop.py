"""The training loop: build, (resume), step, evaluate, log, save. One process or many (torchrun)."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.config import Config, ConfigError, validate
from megalong.model.compile import compile_layers
from megalong.model.gpt import build_model_chunks, model_flops_per_token, position_ids_for
from megalong.moe.layer import moe_aux_loss, update_router_biases
from megalong.parallel.distributed import ParallelLayout, initialize
from megalong.train import checkpoint as ckpt
from megalong.train.batches import eval_batches, fetch, micro_batch_indices
from megalong.preflight import check_train_inputs
from megalong.train.metrics import Reporter, Throughput, format_duration, memory_gib
from megalong.train import megatron_dp
from megalong.train.nonfinite import NonFiniteGuard
from megalong.train.optim import build_optimizer, clip_gradients, reduce_tied_embedding_gradients
from megalong.train.pipeline import pipeline_forward_backward, pipeline_moe_stats
from megalong.train.schedule import learning_rate

log = logging.getLogger("megalong")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (1-based)
    grad_norms: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    final_valid_loss: Optional[float] = None
    checkpoint: Optional[Path] = None
    tokens_per_second: Optional[float] = None


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens the loss mask keeps."""
    tokens = batch["tokens"]
    per_token = model(tokens, position_ids_for(tokens), None, labels=batch["labels"])
    mask = batch["loss_mask"].to(per_token.dtype)
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def _autocast(cfg: Config, device: torch.device):
    if cfg.execution.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mean_over_data_parallel(value: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    return value


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _step_one_replica(optimizer: torch.optim.Optimizer, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and step when there is one data-parallel rank (no gradient exchange but TP/PP's).
    Returns (grad norm, 1.0 if its update was applied else 0.0) as device tensors.

    With train.nonfinite: skip, a step whose gradient norm (the same on every rank: it is reduced
    over the TP, EP and PP groups) is not finite is dropped on the device, without a host sync:
    the fused AdamW kernel skips the update, weight decay and the step count when `found_inf` is
    set, as it does for torch's GradScaler. (Otherwise the run stops at the next check.)"""
    norm = clip_gradients([p for g in optimizer.param_groups for p in g["params"]], cfg.train.grad_clip)
    applied = torch.isfinite(norm).float()
    if cfg.train.nonfinite == "skip":
        if not optimizer.defaults.get("fused"):
            raise RuntimeError("train.nonfinite: skip needs the fused AdamW of build_optimizer")
        optimizer.grad_scale, optimizer.found_inf = None, 1.0 - applied
    optimizer.step()
    return norm, applied


def train_step(model: torch.nn.Module, optimizer, micro_batches: Iterable[dict[str, torch.Tensor]],
               n_micro: int, lr: float, cfg: Config, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `n_micro` accumulated micro-batches. `model` is megatron-core's DDP
    (with `optimizer` its optimizer) when there are several data-parallel ranks.

    Returns (LM loss, MoE auxiliary loss, grad norm, applied); the gradient is that of the sum of
    the losses; `applied` is 0.0 when a non-finite step's update was dropped (train.nonfinite)."""
    lm_total = torch.zeros((), device=device)
    aux_total = torch.zeros((), device=device)

    def backward(batch: dict[str, torch.Tensor]) -> None:
        nonlocal lm_total, aux_total
        with _autocast(cfg, device):
            loss = lm_loss(model, batch) / n_micro
            aux = moe_aux_loss(model)
            aux = aux / n_micro if aux is not None else torch.zeros((), device=device)
        (loss + aux).backward()
        lm_total += loss.detach()
        aux_total += aux.detach()

    if isinstance(optimizer, torch.optim.Optimizer):
        _set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for batch in micro_batches:
            backward(batch)
        norm, applied = _step_one_replica(optimizer, cfg)
    else:
        megatron_dp.zero_gradients([model], optimizer)
        megatron_dp.accumulate([model], micro_batches, n_micro, backward)
        megatron_dp.finalize_gradients([model])
        norm, applied = megatron_dp.step(optimizer, lr)
    update_router_biases(model, applied)
    return _mean_over_data_parallel(lm_total), _mean_over_data_parallel(aux_total), norm, applied


def pipeline_train_step(chunks: torch.nn.ModuleList, optimizer,
                        micro_batches: Iterable[dict[str, torch.Tensor]], n_micro: int, lr: float,
                        cfg: Config, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """train_step with pipeline stages: megatron's schedule runs forward and backward (and, with
    megatron-core DDP, reduces the gradients over data-parallel ranks and tied embeddings through
    the hooks megatron_dp.pipeline_hooks set), then the step."""
    megatron = not isinstance(optimizer, torch.optim.Optimizer)
    if megatron:
        megatron_dp.zero_gradients(list(chunks), optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    lm, aux = pipeline_forward_backward(list(chunks), micro_batches, n_micro,
                                        lambda: _autocast(cfg, device))
    if megatron:
        norm, applied = megatron_dp.step(optimizer, lr)
    else:
        _set_lr(optimizer, lr)
        reduce_tied_embedding_gradients(list(chunks))
        norm, applied = _step_one_replica(optimizer, cfg)
    update_router_biases(chunks, applied)
    return _mean_over_data_parallel(lm), _mean_over_data_parallel(aux), norm, applied


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, cfg: Config, layout: ParallelLayout) -> float:
    """Mean loss over the first `eval_iters` global batches of the held-out split."""
    was_training = model.training
    model.eval()
    t = cfg.train
    losses = []
    batches = (fetch(dataset, indices, layout.device) for indices in eval_batches(
        dataset, t.eval_iters, t.global_batch_size, t.micro_batch_size, layout.data_parallel,
        layout.data_rank))
    if layout.pipeline_parallel > 1:
        n_micro = t.eval_iters * t.global_batch_size // (t.micro_batch_size * layout.data_parallel)
        lm, _ = pipeline_forward_backward(list(model), batches, n_micro,
                                          lambda: _autocast(cfg, layout.device), forward_only=True)
        losses.append(lm)
    for batch in batches:  # without pipeline stages (empty after the pipeline consumed it)
        with _autocast(cfg, layout.device):
            losses.append(lm_loss(model, batch))
    model.train(was_training)
    return float(_mean_over_data_parallel(torch.stack(losses).mean()))


def _build_datasets(cfg: Config, tokenizer):
    from megalong.data.datasets import build_gpt_datasets
    from megalong.data.index_cache import index_cache_root

    t = cfg.train
    cache = index_cache_root(cfg)
    prefixes = [(entry.weight, entry.path) for entry in cfg.data.train]
    num_samples = (t.train_steps * t.global_batch_size, t.eval_iters * t.global_batch_size, 0)

    # megatron-core builds on rank 0 first and lets the others read its index cache.
    return build_gpt_datasets(prefixes, cfg.data.split, cfg.seq_length, t.seed, tokenizer,
                              num_samples, cache)


def _describe(cfg: Config, model: torch.nn.Module, layout: ParallelLayout) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    kinds = cfg.layer_kinds()
    summary = ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))
    return (f"model: {cfg.model.num_layers} layers ({summary}), hidden {cfg.model.hidden_size}, "
            f"{cfg.model.num_attention_heads} heads, {n_params / 1e6:.2f}M parameters on this rank; "
            f"processes: {layout.world_size} (tensor {layout.tensor_parallel} x pipeline "
            f"{layout.pipeline_parallel} x data {layout.data_parallel}) on {layout.device.type}"
            f"{'; layers torch.compiled (the first steps compile)' if cfg.execution.compile else ''}")


def open_reporter(cfg: Config, layout: ParallelLayout, start_step: int, end_step: int) -> Reporter:
    """Progress bar, log lines, TensorBoard and `<save_dir>/metrics.jsonl`, written by rank 0."""
    t = cfg.train
    metrics_file = None
    if t.save_dir and layout.rank == 0:
        Path(t.save_dir).mkdir(parents=True, exist_ok=True)
        metrics_file = str(Path(t.save_dir) / "metrics.jsonl")
    return Reporter(end_step, start_step, layout.rank == 0, t.progress_bar, t.tensorboard_dir,
                    metrics_file)


def _report_moe(reporter: Reporter, step: int, model: torch.nn.Module, aux: float) -> None:
    """Per MoE layer (of every pipeline stage), of the last micro-batch on this rank: expert load
    spread and dropped tokens. Collective over the pipeline stages: every rank calls it."""
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
    reporter.line(f"  moe: aux loss {aux:.4f} | " + " | ".join(parts))
    reporter.scalars(step, scalars)


def train(cfg: Config) -> TrainResult:
    """Train as configured; every process of a torchrun job calls this."""
    from megalong.data.tokenizer import SentencePieceTokenizer

    if cfg.train.engine == "deepspeed":  # DeepSpeed ZeRO runs its own step (deepspeed_engine.py)
        from megalong.train.deepspeed_engine import train as train_with_deepspeed

        return train_with_deepspeed(cfg)
    t = cfg.train
    p = cfg.parallel
    layout = initialize(p.tensor, p.backend, p.expert, pipeline_parallel=p.pipeline,
                        virtual_stages=p.virtual_stages)
    validate(cfg, world_size=layout.world_size)
    check_train_inputs(cfg)  # tokenizer, datasets, output directories, another run's checkpoints
    ckpt.prepare_save_dir(cfg, layout.rank)  # train.overwrite: true deletes them, after every check
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} pieces of data.tokenizer {cfg.data.tokenizer}")

    torch.manual_seed(t.seed)  # identical on every rank: any TP size starts from the same weights
    chunks = [chunk.to(layout.device) for chunk in build_model_chunks(cfg, tokenizer.vocab_size)]
    if cfg.execution.compile:
        for chunk in chunks:
            compile_layers(chunk)
    if layout.data_parallel > 1:  # megatron-core DDP and optimizer (megalong/train/megatron_dp.py)
        from megalong import compat

        compat.install(cuda_on_cpu=True)  # its buffers and optimizer allocate on torch.cuda.current_device()
        run_chunks = megatron_dp.wrap_data_parallel(chunks, cfg)
        optimizer = megatron_dp.build_megatron_optimizer(run_chunks, cfg)
        if layout.pipeline_parallel > 1:
            megatron_dp.pipeline_hooks(run_chunks)
    else:
        run_chunks = chunks
        optimizer = build_optimizer(torch.nn.ModuleList(chunks), t)
    # With pipeline stages the model is this rank's list of chunks (one per virtual stage).
    core = chunks[0] if layout.pipeline_parallel == 1 else torch.nn.ModuleList(chunks)
    model = run_chunks[0] if layout.pipeline_parallel == 1 else torch.nn.ModuleList(run_chunks)
    start_step = 0
    resume = ckpt.resume_path(cfg)
    if resume is not None:
        start_step = ckpt.load_checkpoint(resume, cfg, core, optimizer, layout)
    else:
        torch.manual_seed(t.seed + 1 + layout.data_rank)  # dropout differs across DP replicas

    train_set, valid_set, _ = _build_datasets(cfg, tokenizer)

    n_micro = t.global_batch_size // (t.micro_batch_size * layout.data_parallel)
    end_step = min(t.train_steps, t.stop_at_step or t.train_steps)
    tokens_per_step = t.global_batch_size * cfg.seq_length
    throughput = Throughput(tokens_per_step, model_flops_per_token(cfg, chunks[0].vocab_size),
                            t.peak_tflops * 1e12 * layout.world_size)
    reporter = open_reporter(cfg, layout, start_step, end_step)
    reporter.line(_describe(cfg, core, layout))
    if layout.data_parallel > 1:
        reporter.line(megatron_dp.describe(optimizer, cfg))
    reporter.line(f"data: {len(train_set)} training and {len(valid_set) if valid_set else 0} held-out "
                  f"samples of {cfg.seq_length} tokens; {tokens_per_step} tokens per step "
                  f"({n_micro} micro-batches of {t.micro_batch_size} per process)")
    if len(cfg.data.train) > 1:
        from megalong.data.datasets import describe_blend

        reporter.line(describe_blend("train", train_set))
    if resume is not None:
        reporter.line(f"resumed from {resume} at step {start_step}")

    moe_layers = "moe" in cfg.mlp_kinds()
    result = TrainResult()
    guard = NonFiniteGuard(t.nonfinite, t.max_skipped_steps, resume)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    window: list[list[float]] = []  # host values of the steps since the last log line

    def check_pending() -> None:
        """One host sync for the steps not checked yet: their metrics, and the non-finite check."""
        if not pending:
            return
        values = torch.stack([torch.stack([l, a, n.to(l.device), ok.to(l.device)])
                              for _, l, a, n, ok in pending]).tolist()
        for (s, *_), (l, a, n, ok) in zip(pending, values):
            result.losses[s], result.grad_norms[s] = l, n
            record = {"train/loss": l, "train/grad_norm": n, "train/lr": learning_rate(s - 1, t)}
            try:
                message = guard.record(s, l, n, bool(ok))
            finally:  # the metrics of the step that stops the run are written too
                if t.nonfinite == "skip":
                    record["train/skipped_steps"] = guard.skipped_total
                reporter.scalars(s, {**record, "train/moe_aux_loss": a} if moe_layers else record)
            if message is not None:
                reporter.line(message)
        window.extend(values)
        pending.clear()

    model.train()
    for step in range(start_step, end_step):
        lr = learning_rate(step, t)
        indices = micro_batch_indices(step, t.global_batch_size, t.micro_batch_size,
                                      layout.data_parallel, layout.data_rank)
        batches = (fetch(train_set, idx, layout.device) for idx in indices)
        step_fn = pipeline_train_step if layout.pipeline_parallel > 1 else train_step
        pending.append((step + 1, *step_fn(model, optimizer, batches, n_micro, lr, cfg, layout.device)))
        throughput.step_done()
        done = step + 1

        if done % t.log_interval == 0 or done == end_step:
            check_pending()
            values = [v for v in window if math.isfinite(v[0])] or list(window)  # skipped steps left out
            window_loss = sum(v[0] for v in values) / len(values)
            window.clear()
            tokens_per_s, mfu = throughput.window()
            result.tokens_per_second = tokens_per_s
            reporter.line(f"step {done}/{end_step} | loss {window_loss:.4f} | lr {lr:.3e} | "
                          f"grad norm {values[-1][2]:.3f} | {tokens_per_s:,.0f} tokens/s | "
                          f"MFU {100 * mfu:.2f}% | mem {memory_gib(layout.device):.2f} GiB | "
                          f"ETA {format_duration(throughput.eta(end_step - done))}")
            reporter.scalars(done, {"perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu,
                                    "perf/memory_gib": memory_gib(layout.device)})
            if moe_layers:
                _report_moe(reporter, done, core, values[-1][1])
        reporter.advance({"loss": f"{result.losses[max(result.losses)]:.3f}"} if result.losses else {})

        if valid_set is not None and done % t.eval_interval == 0 and done != end_step:
            check_pending()
            result.valid_losses[done] = evaluate(model, valid_set, cfg, layout)
            reporter.line(f"step {done}: held-out loss {result.valid_losses[done]:.4f} "
                          f"(perplexity {math.exp(result.valid_losses[done]):.2f})")
            reporter.scalars(done, {"valid/loss": result.valid_losses[done]})
        if t.save_dir and t.save_interval and done % t.save_interval == 0 and done != end_step:
            check_pending()
            if guard.may_save:
                guard.last_checkpoint = ckpt.save_checkpoint(t.save_dir, done, cfg, core, optimizer, layout,
                                                             cfg.data.tokenizer, tokenizer.vocab_size, resume)
            else:
                reporter.line(f"step {done}: no checkpoint written: the last {guard.streak} steps were "
                              f"skipped (train.nonfinite: skip)")

    if valid_set is not None:
        result.final_valid_loss = evaluate(model, valid_set, cfg, layout)
        result.valid_losses[end_step] = result.final_valid_loss
        reporter.scalars(end_step, {"valid/loss": result.final_valid_loss})
        reporter.line(f"held-out loss {result.final_valid_loss:.4f}, perplexity "
                      f"{math.exp(result.final_valid_loss):.2f} after {end_step} steps")
    if t.save_dir:
        result.checkpoint = ckpt.save_checkpoint(t.save_dir, end_step, cfg, core, optimizer, layout,
                                                 cfg.data.tokenizer, tokenizer.vocab_size, resume)
        reporter.line(f"saved {result.checkpoint}")
    reporter.close()
    return result
