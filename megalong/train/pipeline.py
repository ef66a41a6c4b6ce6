"""One optimizer step's forward and backward through megatron-core's pipeline schedules.

`parallel.pipeline` > 1 runs megatron's 1F1B schedule (interleaved 1F1B with
`parallel.virtual_stages` > 1) over this rank's model chunks. Every stage reads the whole
micro-batch (token ids are needed on the first stage, labels and loss mask on the last; both are
small). MoE auxiliary losses are produced on the stage that holds the MoE layer, far from the LM
loss: they are attached to that stage's output with `_AttachAuxLoss`, whose backward feeds them
the gradient they would get as terms of the loss (1 / number of micro-batches), as megatron's
MoEAuxLossAutoScaler does. Reversible models (megalong/model/reversible.py) send both streams
across a stage boundary, concatenated along the sequence: the schedule's p2p buffers are then
[2 * seq, micro-batch, hidden].
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megalong.parallel.context import context_loss, context_size, sum_over_context
from megalong.moe.layer import AttachAuxLoss, RoutingStats, moe_aux_loss, moe_stats
from megalong.train.documents import model_inputs
from megalong.train.losses import masked_mean


def reversible_chunks(chunks: list[torch.nn.Module]) -> bool:
    from megalong.model.reversible import ReversibleTransformerBlock

    return any(isinstance(m, ReversibleTransformerBlock) for chunk in chunks for m in chunk.modules())


def pipeline_forward_backward(chunks: list[torch.nn.Module], micro_batches: Iterable[dict],
                              n_micro: int, autocast: Callable[[], contextlib.AbstractContextManager],
                              forward_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (and backward unless `forward_only`) of `n_micro` micro-batches through the
    pipeline. Returns (mean LM loss, mean MoE aux loss) over the micro-batches, on every stage."""
    batches = list(micro_batches)
    device = next(chunks[0].parameters()).device
    aux_values: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, positions, kwargs = model_inputs(batch)  # segment ids: from each stage's own copy
        with autocast():
            output = model(tokens, positions, None, labels=batch["labels"], **kwargs)
            # this forward's MoE layers only
            aux: Optional[torch.Tensor] = moe_aux_loss(model, None if forward_only else 1.0 / n_micro)
        if aux is not None:
            aux_values.append(aux.detach())
            if not forward_only:
                output = AttachAuxLoss.apply(output, aux, 1.0 / n_micro)
        if output.dtype != torch.float32:  # stages exchange float32 (TransformerConfig.pipeline_dtype)
            output = output.float()

        def loss_func(per_token: torch.Tensor):
            if context_size() > 1:  # the whole sequence's mean; the schedule multiplies by the CP size
                loss = context_loss(per_token, batch["loss_mask"])
                return loss / context_size(), {"lm": loss.detach().clone()}
            loss = masked_mean(per_token, batch["loss_mask"])
            return loss, {"lm": loss.detach().clone()}  # the schedule divides `loss` in place

        return output, loss_func

    iterators = [iter(batches) for _ in chunks]
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=n_micro,
        # megatron divides the sequence length by the context-parallel size: this rank's chunk x N
        seq_length=batches[0]["tokens"].shape[1] * context_size() * (2 if reversible_chunks(chunks) else 1),
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    lm = torch.zeros((), device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        lm = torch.stack([r["lm"] for r in reduced]).sum() / n_micro
    aux = torch.stack(aux_values).sum() / n_micro if aux_values else torch.zeros((), device=device)
    both = torch.stack([lm, aux])
    dist.all_reduce(both, group=parallel_state.get_pipeline_model_parallel_group())
    return both[0], both[1]


def whole_sequence_stats(stats: RoutingStats) -> RoutingStats:
    """The routing statistics of the whole sequences of a micro-batch: at context parallelism each
    rank routed one chunk of them, its loads, drops and assignments summed over the context group."""
    if context_size() == 1:
        return stats
    counts = torch.cat([stats.load.double(), stats.dropped.double().reshape(1),
                        stats.load.new_tensor([stats.assignments], dtype=torch.float64)])
    counts = sum_over_context(counts)
    return RoutingStats(counts[:-2].round().long(), counts[-2].round().long(), int(counts[-1]))


def pipeline_moe_stats(model: torch.nn.Module) -> list[tuple[int, RoutingStats]]:
    """`moe_stats` of the MoE layers of every stage of this rank's pipeline, by layer number (each
    stage's own MoE layers only are on its model), of whole sequences at context parallelism. A
    collective over the pipeline and context groups: every rank calls it."""
    own = [(layer, whole_sequence_stats(s)) for layer, s in moe_stats(model)]
    if (not parallel_state.model_parallel_is_initialized()
            or parallel_state.get_pipeline_model_parallel_world_size() == 1):
        return own
    mine = [(layer, s.load.tolist(), int(s.dropped), s.assignments) for layer, s in own]
    stages: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())
    every = [entry for stage in stages for entry in stage]
    return [(layer, RoutingStats(torch.tensor(load), torch.tensor(dropped), n))
            for layer, load, dropped, n in sorted(every, key=lambda e: e[0])]
