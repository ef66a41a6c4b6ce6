"""The training loop, one for every engine (megalong/train/engine.py): build, (resume), step,
evaluate, log, save. One process or many (torchrun, deepspeed).

The loop owns what is the same for every engine: seeding, the datasets and which samples each
rank reads at each step, the learning-rate schedule, logging, when to evaluate and to save,
resuming, non-finite steps (megalong/train/nonfinite.py) and the step directories
(megalong/checkpoint/step.py). Host values of a step are read only at log intervals and before an
evaluation or a checkpoint, so the loop adds no host synchronisation per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megalong.checkpoint import layout as save_dirs
from megalong.checkpoint import step as checkpoints
from megalong.checkpoint.init_from import KEY, init_from
from megalong.config import Config, ConfigError, validate
from megalong.model.compile import compile_layers
from megalong.model.gpt import build_model_chunks, model_flops_per_token
from megalong.parallel.distributed import ParallelLayout
from megalong.preflight import check_train_inputs
from megalong.train import run_log
from megalong.train.batches import eval_batches, fetch, micro_batch_indices
from megalong.train.documents import DocumentBatching
from megalong.train.engine import Engine, StepResult
from megalong.train.engines import build_engine, initialize_for
from megalong.train.losses import mean_over_data_parallel
from megalong.train.metrics import Reporter, Throughput
from megalong.train.nonfinite import NonFiniteGuard
from megalong.train.schedule import learning_rate


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (1-based)
    grad_norms: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    final_valid_loss: Optional[float] = None
    checkpoint: Optional[Path] = None
    tokens_per_second: Optional[float] = None


def evaluate(engine: Engine, dataset, cfg: Config, layout: ParallelLayout,
             documents: Optional[DocumentBatching] = None) -> float:
    """Mean loss over the first `eval_iters` global batches of the held-out split."""
    t = cfg.train
    batches = (fetch(dataset, indices, layout.device, documents) for indices in eval_batches(
        dataset, t.eval_iters, t.global_batch_size, t.micro_batch_size, layout.data_parallel,
        layout.data_rank))
    n_micro = t.eval_iters * t.global_batch_size // (t.micro_batch_size * layout.data_parallel)
    return float(mean_over_data_parallel(engine.evaluate(batches, n_micro)))


def build_datasets(cfg: Config, tokenizer):
    from megalong.data.datasets import build_gpt_datasets
    from megalong.data.index_cache import index_cache_root

    t = cfg.train
    prefixes = [(entry.weight, entry.path) for entry in cfg.data.train]
    num_samples = (t.train_steps * t.global_batch_size, t.eval_iters * t.global_batch_size, 0)
    # megatron-core builds on rank 0 first and lets the others read its index cache.
    return build_gpt_datasets(prefixes, cfg.data.split, cfg.seq_length, t.seed, tokenizer,
                              num_samples, index_cache_root(cfg))


class _Steps:
    """The steps run but not yet read on the host: read together, recorded, checked."""

    def __init__(self, cfg: Config, reporter: Reporter, guard: NonFiniteGuard, result: TrainResult):
        self.cfg, self.reporter, self.guard, self.result = cfg, reporter, guard, result
        self.moe_layers = "moe" in cfg.mlp_kinds()
        self.pending: list[tuple[int, StepResult]] = []
        self.window: list[list[float]] = []  # host values of the steps since the last log line

    def check(self) -> None:
        """One host sync for the steps not checked yet: their metrics, and the non-finite check."""
        if not self.pending:
            return
        t = self.cfg.train
        values = torch.stack([torch.stack([r.lm_loss, r.aux_loss, r.grad_norm.to(r.lm_loss.device),
                                           r.applied.to(r.lm_loss.device)])
                              for _, r in self.pending]).tolist()
        for (s, _), (lm, aux, norm, ok) in zip(self.pending, values):
            self.result.losses[s], self.result.grad_norms[s] = lm, norm
            record = {"train/loss": lm, "train/grad_norm": norm, "train/lr": learning_rate(s - 1, t)}
            try:
                message = self.guard.record(s, lm, norm, bool(ok))
            finally:  # the metrics of the step that stops the run are written too
                if t.nonfinite == "skip":
                    record["train/skipped_steps"] = self.guard.skipped_total
                self.reporter.scalars(s, {**record, "train/moe_aux_loss": aux} if self.moe_layers else record)
            if message is not None:
                self.reporter.line(message)
        self.window.extend(values)
        self.pending.clear()


def _start(cfg: Config):
    """Process groups, checks, tokenizer; (layout, tokenizer)."""
    from megalong.data.tokenizer import SentencePieceTokenizer

    layout = initialize_for(cfg)
    validate(cfg, world_size=layout.world_size)
    check_train_inputs(cfg)  # tokenizer, datasets, output directories, another run's checkpoints
    save_dirs.prepare_save_dir(cfg, layout.rank)  # train.overwrite: true deletes them, after every check
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} pieces of data.tokenizer {cfg.data.tokenizer}")
    return layout, tokenizer


def train(cfg: Config) -> TrainResult:
    """Train as configured; every process of a torchrun job calls this."""
    t = cfg.train
    layout, tokenizer = _start(cfg)
    torch.manual_seed(t.seed)  # identical on every rank: any layout starts from the same weights
    chunks = [chunk.to(layout.device) for chunk in build_model_chunks(cfg, tokenizer.vocab_size)]
    resume = save_dirs.resume_path(cfg)
    # weights only, before compiling (module names) and before the engine copies or partitions them
    initialised = init_from(t.init_from, cfg, chunks, layout) if t.init_from and resume is None else None
    if cfg.execution.compile:
        for chunk in chunks:
            compile_layers(chunk)
    model_line = run_log.describe_model(cfg, chunks, layout)  # before ZeRO-3 partitions the weights
    flops_per_token = model_flops_per_token(cfg, chunks[0].vocab_size)
    engine = build_engine(cfg, layout, chunks)
    start_step = 0
    if resume is not None:
        start_step = checkpoints.load_step(resume, cfg, layout, engine.checkpoint_engine, engine.load)
    else:
        torch.manual_seed(t.seed + 1 + layout.data_rank)  # dropout differs across DP replicas

    train_set, valid_set, _ = build_datasets(cfg, tokenizer)
    documents = DocumentBatching.from_config(cfg.data, tokenizer.eod)
    n_micro = t.global_batch_size // (t.micro_batch_size * layout.data_parallel)
    end_step = min(t.train_steps, t.stop_at_step or t.train_steps)
    throughput = Throughput(t.global_batch_size * cfg.seq_length, flops_per_token,
                            t.peak_tflops * 1e12 * layout.world_size)
    reporter = run_log.open_reporter(cfg, layout, start_step, end_step)
    for line in [model_line, *engine.describe(), *run_log.describe_data(cfg, train_set, valid_set, n_micro)]:
        reporter.line(line)
    if resume is not None:
        reporter.line(f"resumed from {resume} at step {start_step}"
                      + (f" ({KEY} {t.init_from} not applied: a resumed run has its weights)" if t.init_from else ""))
    for line in initialised.lines() if initialised is not None else []:
        reporter.line(line)

    result = TrainResult()
    guard = NonFiniteGuard(t.nonfinite, t.max_skipped_steps, resume)
    steps = _Steps(cfg, reporter, guard, result)
    core = torch.nn.ModuleList(engine.chunks)

    def save(step: int) -> Path:
        return checkpoints.save_step(t.save_dir, step, cfg, layout, lambda tmp: engine.save(tmp, step),
                                     tokenizer.vocab_size, resume)

    engine.train()
    for step in range(start_step, end_step):
        lr = learning_rate(step, t)
        indices = micro_batch_indices(step, t.global_batch_size, t.micro_batch_size,
                                      layout.data_parallel, layout.data_rank)
        steps.pending.append((step + 1, engine.step((fetch(train_set, idx, layout.device, documents) for idx in indices), lr)))
        throughput.step_done()
        done = step + 1

        if done % t.log_interval == 0 or done == end_step:
            steps.check()
            result.tokens_per_second, last = run_log.report_interval(reporter, throughput, done, end_step, lr,
                                                                     steps.window, layout.device)
            if steps.moe_layers:
                run_log.report_moe(reporter, done, core, last[1])
            steps.window.clear()
        reporter.advance({"loss": f"{result.losses[max(result.losses)]:.3f}"} if result.losses else {})

        if valid_set is not None and done % t.eval_interval == 0 and done != end_step:
            steps.check()
            result.valid_losses[done] = evaluate(engine, valid_set, cfg, layout, documents)
            run_log.report_held_out(reporter, done, result.valid_losses[done])
        if t.save_dir and t.save_interval and done % t.save_interval == 0 and done != end_step:
            steps.check()
            if guard.may_save:
                guard.last_checkpoint = save(done)
            else:
                reporter.line(f"step {done}: no checkpoint written: the last {guard.streak} steps were "
                              f"skipped (train.nonfinite: skip)")

    if valid_set is not None:
        result.final_valid_loss = evaluate(engine, valid_set, cfg, layout, documents)
        result.valid_losses[end_step] = result.final_valid_loss
        run_log.report_held_out(reporter, end_step, result.final_valid_loss, final_of=end_step)
    if t.save_dir:
        result.checkpoint = save(end_step)
        reporter.line(f"saved {result.checkpoint}")
    reporter.close()
    return result
