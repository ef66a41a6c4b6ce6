"""A megalong model for evaluation, at any tensor x pipeline layout: per-position log-probabilities
of given targets, whether each target is the argmax, and the argmax over the real vocabulary.

The logits of a tensor-parallel rank hold its slice of the (padded) vocabulary; the softmax is
taken over the whole padded vocabulary, as the exported Hugging Face model's is, from each slice's
maximum and sum of exponentials reduced over the tensor-parallel group, so full logits are never
gathered. With pipeline stages the forward runs through megatron-core's schedule (one
micro-batch) and the last stage's results are broadcast to the other stages: every rank of a
model-parallel group calls `score` with the same tokens and gets the same answer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.config import Config
from megalong.model.gpt import position_ids_for
from megalong.parallel.distributed import ParallelLayout
from megalong.train.documents import DocumentBatching, model_inputs


@dataclass
class Scores:
    """Per position t of a [B, L] batch: log p(target[t] | tokens[:t+1]), whether target[t] is the
    argmax over the padded vocabulary, and the argmax over the tokenizer's ids."""

    logprob: torch.Tensor  # float32 [B, L]
    greedy: torch.Tensor  # bool [B, L]
    argmax: torch.Tensor  # int64 [B, L]


class EvalModel:
    """This rank's model chunks, in eval mode, with what scoring needs to know about them."""

    def __init__(self, chunks: list[torch.nn.Module], cfg: Config, tokenizer: Any,
                 layout: ParallelLayout):
        self.chunks, self.cfg, self.tokenizer, self.layout = chunks, cfg, tokenizer, layout
        self.vocab_size = tokenizer.vocab_size  # real ids; the embedding table may be padded
        # data.document_mask / reset_position_ids / eod_mask_loss, for held-out windows of packed documents
        self.batching = DocumentBatching.from_config(cfg.data, tokenizer.eod)

    @property
    def max_length(self) -> int:
        """The longest context: max_position_embeddings (learned positions cannot go past it)."""
        return self.cfg.model.max_position_embeddings

    @property
    def padding_exact(self) -> bool:
        """Whether right-padding leaves the earlier positions' outputs unchanged: not with LSH
        (buckets depend on later tokens) or MoE layers (capacity and routing over the batch)."""
        return "lsh" not in self.cfg.layer_kinds() and "moe" not in self.cfg.mlp_kinds()

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor, packed: bool = False) -> Scores:
        """Scores of `targets` [B, L] after `tokens` [B, L] (both int64, on any device). `packed`:
        the rows are windows of packed documents (held-out data), attended with the segment ids
        and positions training gave them (data.document_mask, data.reset_position_ids); otherwise
        each row is one text (lm-eval requests, passkey prompts), as the exported model reads it."""
        from megalong.train.losses import autocast

        device = self.layout.device
        tokens, targets = tokens.to(device), targets.to(device)
        for chunk in self.chunks:
            chunk.eval()
        with autocast(self.cfg, device):
            if self.layout.pipeline_parallel == 1:
                ids, positions, kwargs = self._inputs(tokens, packed)
                logits = self.chunks[0](ids, positions, None, **kwargs)
                out = _vocab_parallel_scores(logits.float(), targets, self.vocab_size)
            else:
                out = self._pipeline_scores(tokens, targets, packed)
        return out

    def _inputs(self, tokens: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if not packed or self.batching is None:
            return tokens, position_ids_for(tokens), {}
        return model_inputs(self.batching.apply({"tokens": tokens, "loss_mask": torch.ones(tokens.shape)}))

    def _pipeline_scores(self, tokens: torch.Tensor, targets: torch.Tensor, packed: bool) -> Scores:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megalong.train.pipeline import reversible_chunks

        B, L = tokens.shape
        found: list[Scores] = []

        def forward_step(data_iterator, model):
            ids, positions, kwargs = self._inputs(next(data_iterator), packed)  # each stage from its tokens
            output = model(ids, positions, None, **kwargs)
            if output.dtype != torch.float32:  # stages exchange float32
                output = output.float()

            def loss_func(logits: torch.Tensor):
                found.append(_vocab_parallel_scores(logits.float(), targets, self.vocab_size))
                return logits.new_zeros(()), {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=self.chunks[0],
            num_microbatches=1, seq_length=L * (2 if reversible_chunks(self.chunks) else 1),
            micro_batch_size=B, forward_only=True)
        packed = torch.zeros(3, B, L, dtype=torch.float64, device=tokens.device)
        if found:  # the last stage
            packed[0], packed[1], packed[2] = found[0].logprob, found[0].greedy, found[0].argmax
        group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(packed, src=last, group=group)
        return Scores(packed[0].float(), packed[1].bool(), packed[2].long())


def _vocab_parallel_scores(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> Scores:
    """Scores from this tensor-parallel rank's vocabulary slice of the logits [B, L, V/tp]."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local if tp > 1 else 0
    ids = torch.arange(start, start + local, device=logits.device)
    peak = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = (logits - peak.unsqueeze(-1)).exp().sum(dim=-1)
    mine = (targets >= start) & (targets < start + local)
    picked = torch.where(mine, logits.gather(-1, (targets - start).clamp(0, local - 1).unsqueeze(-1)).squeeze(-1),
                         torch.zeros_like(peak))
    real = logits.masked_fill(ids >= vocab_size, float("-inf"))  # the argmax over real ids
    best_value, best_local = real.max(dim=-1)
    best = torch.stack([best_value, (best_local + start).float()])
    if tp > 1:
        dist.all_reduce(total, group=group)
        dist.all_reduce(picked, group=group)
        gathered = [torch.empty_like(best) for _ in range(tp)]
        dist.all_gather(gathered, best, group=group)
        values = torch.stack([g[0] for g in gathered])
        best = torch.stack([values.max(dim=0).values,
                            torch.stack([g[1] for g in gathered]).gather(0, values.argmax(dim=0, keepdim=True))[0]])
    logprob = picked - peak - total.log()
    return Scores(logprob, picked >= peak, best[1].long())


def load_eval_model(checkpoint: str | Path, tensor: int = 1, pipeline: int = 1) -> EvalModel:
    """The checkpoint's model on this process at tensor x pipeline parallelism (the processes of
    torchrun; the rest is data parallel), its weights sliced from the merged checkpoint."""
    from megalong.checkpoint.files import checkpoint_tokenizer
    from megalong.checkpoint.native import load_whole_model
    from megalong.checkpoint.step import read_checkpoint_info, single_process_config, whole_model_state
    from megalong.config import config_from_dict, validate
    from megalong.model.gpt import build_model_chunks
    from megalong.parallel.distributed import initialize, world_size_from_env

    info = read_checkpoint_info(checkpoint)
    tokenizer = checkpoint_tokenizer(info.path)
    raw = single_process_config(info.config).to_dict()
    raw["parallel"].update({"tensor": tensor, "pipeline": pipeline})
    data_parallel = max(1, world_size_from_env() // (tensor * pipeline))  # the batch sizes are training's
    raw["train"].update({"micro_batch_size": 1, "global_batch_size": data_parallel})
    cfg = config_from_dict(raw)
    validate(cfg, world_size=world_size_from_env(), check_paths=False)
    layout = initialize(tensor, cfg.parallel.backend, pipeline_parallel=pipeline)
    torch.manual_seed(cfg.train.seed)
    chunks = [c.to(layout.device) for c in build_model_chunks(cfg, info.meta["tokenizer_vocab_size"])]
    load_whole_model(whole_model_state(info), info, cfg, chunks, layout)
    return EvalModel(chunks, cfg, tokenizer, layout)
