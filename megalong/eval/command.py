"""`megalong eval CHECKPOINT ...`: what each option runs, at the layout of --tensor x --pipeline
(the torchrun processes; the rest data parallel), results printed on rank 0 and appended to
--output in the format of `metrics.jsonl` (megalong/train/run_log.py)."""
from __future__ import annotations

import argparse

from megalong.evaluate import EvalError


def run(args: argparse.Namespace) -> int:
    if not (args.seq_length or args.tasks or args.per_dataset or args.passkey):
        raise EvalError("nothing to evaluate: give --seq-length, --tasks, --per-dataset or --passkey")
    if args.passkey and not args.seq_length:
        raise EvalError("--passkey: give the lengths to test with --seq-length, e.g. --seq-length 1k 4k")
    if args.seq_length and not (args.tasks or args.per_dataset or args.passkey):
        return _perplexity_only(args)
    from megalong.eval.model import load_eval_model
    from megalong.parallel.distributed import shutdown
    from megalong.train import run_log
    from megalong.train.metrics import Reporter

    try:
        model = load_eval_model(args.checkpoint, args.tensor, args.pipeline)
        from megalong.checkpoint.step import read_checkpoint_info

        step = int(read_checkpoint_info(args.checkpoint).meta["step"])
        reporter = Reporter(0, 0, model.layout.rank == 0, False, None, args.output)
        if args.tasks:
            from megalong.eval.harness import MegalongLM, run_tasks

            results = run_tasks(MegalongLM(model, args.batch_size), args.tasks, args.include_path,
                                args.num_fewshot, args.limit)
            run_log.report_tasks(reporter, step, results)
        if args.per_dataset:
            from megalong.eval.per_dataset import checkpoint_losses

            run_log.report_held_out_per_dataset(reporter, step, checkpoint_losses(model, args.tokens, args.batch_size))
        if args.passkey:
            from megalong.eval.passkey import long_context_report

            report = long_context_report(model, args.seq_length, args.depths, args.trials, args.tokens,
                                         args.data, args.batch_size)
            run_log.report_long_context(reporter, step, report)
        reporter.close()
    finally:
        shutdown()
    return 0


def _perplexity_only(args: argparse.Namespace) -> int:
    from megalong.evaluate import evaluate_checkpoint

    if args.tensor * args.pipeline > 1:
        raise EvalError("--seq-length alone runs in one process; add --passkey to run it at "
                        "--tensor/--pipeline")
    results = evaluate_checkpoint(args.checkpoint, args.seq_length, args.tokens, args.data,
                                  args.split, args.batch_size)
    for r in results:
        print(f"seq_length {r.seq_length}: loss {r.loss:.4f}, perplexity {r.perplexity:.2f} "
              f"({r.tokens} tokens)")
    if args.output:
        write_perplexity(args.output, args.checkpoint, results)
    return 0


def write_perplexity(path: str, checkpoint: str, results: list) -> None:
    """One record per length, appended: {"step": the checkpoint's, "report": "long_context",
    "seq_length", "loss", "perplexity", "tokens"} (the passkey report's records, less "passkey")."""
    import json
    from pathlib import Path

    from megalong.checkpoint.step import read_checkpoint_info
    from megalong.paths import writing
    from megalong.plots.runs import LONG_CONTEXT

    step = int(read_checkpoint_info(checkpoint).meta["step"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with writing(path), open(path, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"step": step, "report": LONG_CONTEXT, "seq_length": r.seq_length,
                                "loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}) + "\n")
