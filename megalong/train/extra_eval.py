"""What training evaluates beside the blended held-out loss: the held-out loss of each data.train
dataset (train.eval_per_dataset) and lm-evaluation-harness tasks (train.eval_tasks), logged by
run_log like the losses. Collective: every rank calls these at the same steps."""
from __future__ import annotations

from typing import Any, Callable, Optional

from megalong.config import Config, ConfigError
from megalong.parallel.distributed import ParallelLayout
from megalong.train import run_log
from megalong.train.metrics import Reporter


class ExtraEval:
    def __init__(self, cfg: Config, tokenizer: Any, layout: ParallelLayout, has_valid: bool):
        t = cfg.train
        self.cfg, self.tokenizer, self.layout = cfg, tokenizer, layout
        self.per_dataset: dict[str, Any] = {}
        if has_valid and t.eval_per_dataset and len(cfg.data.train) > 1:
            from megalong.eval.per_dataset import valid_sets

            self.per_dataset = valid_sets(cfg, tokenizer, t.eval_iters * t.global_batch_size)
        self.tasks: Optional[Any] = None
        if t.eval_tasks:
            self.tasks = _task_manager(cfg)

    def held_out(self, step: int, reporter: Reporter, evaluate: Callable[[Any], float]) -> None:
        """The held-out loss of each dataset, by the loop's own evaluation (`evaluate(dataset)`)."""
        if self.per_dataset:
            run_log.report_held_out_per_dataset(reporter, step, {name: evaluate(ds) for name, ds in
                                                                 self.per_dataset.items()})

    def tasks_due(self, done: int, end_step: int) -> bool:
        every = self.cfg.train.eval_tasks_interval
        return self.tasks is not None and (done == end_step or (every is not None and done % every == 0))

    def run_tasks(self, step: int, reporter: Reporter, chunks: list) -> None:
        from megalong.eval.harness import MegalongLM, run_tasks
        from megalong.eval.model import EvalModel

        t = self.cfg.train
        was_training = [chunk.training for chunk in chunks]
        try:
            lm = MegalongLM(EvalModel(chunks, self.cfg, self.tokenizer, self.layout), t.micro_batch_size)
            results = run_tasks(lm, list(t.eval_tasks), t.eval_tasks_include_path, None, t.eval_tasks_limit,
                                task_manager=self.tasks)
        finally:
            for chunk, mode in zip(chunks, was_training):
                chunk.train(mode)
        run_log.report_tasks(reporter, step, results)


def _task_manager(cfg: Config) -> Any:
    """lm-eval's task index, with every train.eval_tasks name checked before training starts."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("train.eval_tasks: needs lm-evaluation-harness: pip install -e \".[eval]\"") from None
    t = cfg.train
    manager = TaskManager(include_path=t.eval_tasks_include_path) if t.eval_tasks_include_path else TaskManager()
    unknown = [name for name in t.eval_tasks if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"train.eval_tasks: lm-eval knows no task {unknown[0]!r}"
                          + (f" (nor train.eval_tasks_include_path {t.eval_tasks_include_path})"
                             if t.eval_tasks_include_path else ""))
    return manager
