"""lm-evaluation-harness over megalong's own model: `MegalongLM` (an lm-eval `TemplateLM`) and
`run_tasks`, for `megalong eval --tasks` and `train.eval_tasks`.

Context and continuation are encoded as lm-eval's `hf` model encodes them (TemplateLM), and
scored like it: the input is (context + continuation)[-(max_length + 1):][:-1], right-padded in
batches sorted by length, the softmax over the whole (padded) vocabulary. Models whose outputs
depend on padding (LSH, MoE layers: `EvalModel.padding_exact`) batch only inputs of one length.
Generation is greedy over the tokenizer's ids, recomputing the context at each token.

Every process runs lm-eval on all requests (lm-eval sees one process); the requests are shared
out over the data-parallel replicas, each replica's model-parallel ranks compute the same batches
together, and the results are gathered over the data-parallel group, so every rank returns the
same answers and lm-eval's metrics agree everywhere."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megalong.eval.model import EvalModel


class MegalongLM(TemplateLM):
    def __init__(self, model: EvalModel, batch_size: int = 8, max_length: Optional[int] = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self._max_length = max_length or model.max_length
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.model.tokenizer.decode(list(ids))

    # ---- scoring ----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        inputs = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append((whole[:-1], whole[1:], len(continuation)))

        def run(batch: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
            scores = self._score([inp for inp, _, _ in batch], [tgt for _, tgt, _ in batch])
            out = []
            for row, (inp, _, n) in enumerate(batch):
                end = len(inp)
                lp, greedy = scores.logprob[row, end - n:end], scores.greedy[row, end - n:end]
                out.append((float(lp.double().sum()), bool(greedy.all())))
            return out

        answers = self._batched(inputs, lambda x: len(x[0]), run)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, context, pred))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megalong.evaluate import EvalError

        jobs = []
        for context, kwargs in (req.args for req in requests):
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) not in (0, 0.0, None):
                raise EvalError("--tasks: megalong's lm-eval model generates greedily; a task asked "
                                f"for sampling ({kwargs})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - limit):]
            jobs.append((ids, [stop for stop in until if stop], limit))
        texts = self._batched(jobs, lambda j: len(j[0]), self._generate)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _generate(self, batch: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Greedy continuations of a batch of contexts, until a stop string or the token limit."""
        rows = [list(ids) for ids, _, _ in batch]
        new: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(max(limit for _, _, limit in batch)):
            live = [r for r in range(len(batch)) if not done[r]]
            if not live:
                break
            contexts = [rows[r][-self.max_length:] for r in live]
            scores = self._score(contexts, contexts)  # the targets are not used: argmax only
            for k, r in enumerate(live):
                token = int(scores.argmax[k, len(contexts[k]) - 1])
                rows[r].append(token)
                new[r].append(token)
                text = self.tok_decode(new[r])
                if (token == self.eot_token_id or len(new[r]) >= batch[r][2]
                        or any(stop in text for stop in batch[r][1])):
                    done[r] = True
        out = []
        for (_, until, _), ids in zip(batch, new):
            text = self.tok_decode([t for t in ids if t != self.eot_token_id])
            for stop in until:
                if stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out

    def _score(self, inputs: list[list[int]], targets: list[list[int]]):
        """One right-padded batch through the model."""
        width = max(len(x) for x in inputs)
        tokens = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        labels = torch.zeros_like(tokens)
        for row, (inp, tgt) in enumerate(zip(inputs, targets)):
            tokens[row, :len(inp)] = torch.tensor(inp)
            labels[row, :len(tgt)] = torch.tensor(tgt)
        scores = self.model.score(tokens, labels)
        return type(scores)(scores.logprob.cpu(), scores.greedy.cpu(), scores.argmax.cpu())

    def _batched(self, items: list, length: Callable[[Any], int], run: Callable[[list], list]) -> list:
        """run() over batches of `items` (longest first; one length per batch where padding is not
        exact), this data-parallel replica's share of the batches, gathered back in order."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        batches: list[list[int]] = []
        for i in order:
            last = batches[-1] if batches else None
            if (last is not None and len(last) < self.batch_size
                    and (self.model.padding_exact or length(items[last[0]]) == length(items[i]))):
                last.append(i)
            else:
                batches.append([i])
        dp, rank = _data_parallel()
        mine = {}
        for b in range(rank, len(batches), dp):
            mine.update(zip(batches[b], run([items[i] for i in batches[b]])))
        if dp > 1:
            from megatron.core import parallel_state

            every: list = [None] * dp
            dist.all_gather_object(every, mine, group=parallel_state.get_data_parallel_group())
            mine = {k: v for part in every for k, v in part.items()}
        return [mine[i] for i in range(len(items))]


def _data_parallel() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()


def run_tasks(lm: TemplateLM, tasks: list[str], include_path: Optional[str] = None,
              num_fewshot: Optional[int] = None, limit: Optional[float] = None,
              task_manager: Any = None) -> dict[str, dict[str, float]]:
    """lm-eval's simple_evaluate over `tasks`; {task: {metric: value}} (numbers only)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megalong.evaluate import EvalError

    manager = task_manager or (TaskManager(include_path=include_path) if include_path else TaskManager())
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under --include-path {include_path})" if include_path else ""
        raise EvalError(f"--tasks: lm-eval knows no task {unknown[0]!r}{where}")
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                              limit=limit, log_samples=False, bootstrap_iters=0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # lm-eval returns the results only where LOCAL_RANK is 0 (None on torchrun's other
        # processes); the ranks' metrics agree (see above), so all take global rank 0's.
        shared = [results]
        dist.broadcast_object_list(shared, src=0)
        results = shared[0]
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key:
                out.setdefault(task, {})[key.split(",")[0]] = float(value)
    return out
