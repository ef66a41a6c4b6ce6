"""Data parallelism through megatron-core: its `DistributedDataParallel` (gradients in contiguous
buffers, reduced bucket by bucket, optionally while the backward still runs) and its optimizer
(Adam; with `parallel.distributed_optimizer` the Adam state and the float32 update are sharded over
the data-parallel ranks, gradients are reduce-scattered and the updated weights all-gathered).

Used by megalong/train/megatron_engine.py whenever there is more than one data-parallel rank; one
data-parallel rank needs no gradient exchange and steps a plain AdamW (megalong/train/torch_engine.py).

Expert weights (attribute `expert_parallel`) are marked `allreduce = False`, megatron's sign for
weights that differ across expert-parallel ranks: DDP reduces them over the expert-data-parallel
group only, and the optimizer keeps them in a separate instance.

Checkpoints store Adam's state per parameter, whole (megalong/checkpoint/ merges and
re-splits it for any layout): `adam_state` gathers the shards of the distributed optimizer and
`load_adam_state` keeps this rank's part of them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong.config import Config
from megalong.train.optim import no_weight_decay


def wrap_data_parallel(chunks: list[torch.nn.Module], cfg: Config) -> list[torch.nn.Module]:
    """Each model chunk in megatron-core's DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.distributed_optimizer,
        bucket_size=p.ddp_bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        for param in chunk.parameters():
            if getattr(param, "expert_parallel", False):
                param.allreduce = False
        # Megatron-LM buckets only the first chunk of an interleaved pipeline; the others' gradients
        # are reduced after the schedule, in one go (megatron's rule, kept).
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def build_megatron_optimizer(ddp_chunks: list[torch.nn.Module], cfg: Config):
    """megatron-core's Adam(W) over DDP-wrapped chunks, with megalong's weight-decay groups and
    `train.grad_clip`."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    t, p = cfg.train, cfg.parallel
    config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.grad_clip, use_distributed_optimizer=p.distributed_optimizer,
        decoupled_weight_decay=True, params_dtype=torch.float32)
    no_decay_key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="megalong_no_decay",
                                                                       fn=no_weight_decay))
    optimizer = get_megatron_optimizer(config, ddp_chunks, config_overrides={no_decay_key: {"wd_mult": 0.0}})
    # megatron's LR scheduler would apply `wd_mult`; megalong sets the rates itself.
    for group in optimizer.param_groups:
        group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
    # megatron-core 0.16.1 gives the expert optimizer the dense tensor-parallel group for telling
    # TP duplicates apart (its TODO at optimizer/__init__.py:472). Experts are not sliced by TP
    # (expert-tensor size 1) and TP peers hold different experts, so with the dense group the
    # gradient norm would drop every expert held off TP rank 0.
    for sub in _sub_optimizers(optimizer):
        if any(group.get("is_expert_parallel") for group in sub.param_groups):
            sub.tp_group = parallel_state.get_expert_tensor_parallel_group()
    return optimizer


def zero_gradients(ddp_chunks: list[torch.nn.Module], optimizer) -> None:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def accumulate(ddp_chunks: list[torch.nn.Module], micro_batches: Iterable, n_micro: int,
               backward: Callable[[object], None]) -> None:
    """`backward(batch)` for each micro-batch; gradients are reduced over data-parallel ranks
    only after the last one (with `overlap_grad_reduce`, bucket by bucket during its backward)."""
    for i, batch in enumerate(micro_batches):
        last = i == n_micro - 1
        with contextlib.ExitStack() as stack:
            if not last:
                for chunk in ddp_chunks:
                    stack.enter_context(chunk.no_sync())
            backward(batch)


def finalize_gradients(ddp_chunks: list[torch.nn.Module]) -> None:
    """Complete the data-parallel reduction (and the tied-embedding sum across pipeline stages,
    which megatron's pipeline schedules do themselves through `pipeline_hooks`)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(ddp_chunks)


def step(optimizer, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to `train.grad_clip` and step; returns (the gradient norm before clipping, 1.0 if the
    update was applied else 0.0).

    megatron-core's ChainedOptimizer.step, with one addition: a step whose gradient norm is not
    finite is dropped. Its mixed-precision optimizers drop a step whose gradients hold inf/NaN
    (`prepare_grads`), its float32 optimizer would apply it and turn every weight into NaN. The
    norm is reduced over the model-parallel ranks and the gradients over the data-parallel ranks,
    so every rank takes the same decision; it is a host float already (megatron synchronises to
    compute it), so the check costs nothing more."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for group in optimizer.param_groups:
        group["lr"] = lr
    if optimizer.prepare_grads():  # found inf/NaN (mixed precision; its loss scale is updated)
        return torch.tensor(float("nan")), torch.tensor(0.0)
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return torch.tensor(norm), torch.tensor(0.0)
    for sub in _sub_optimizers(optimizer):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=sub.config.clip_grad, total_norm=norm,
                                         use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    if not optimizer.step_with_ready_grads():
        raise RuntimeError("megatron-core's optimizer did not apply the step")
    return torch.tensor(norm), torch.tensor(1.0)


def pipeline_hooks(ddp_chunks: list[torch.nn.Module]) -> None:
    """What megatron's pipeline schedules call on the model config: the DDP no-sync context for
    all but the last micro-batch, and finalize_model_grads after the last backward."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_chunks[0].module.config if hasattr(ddp_chunks[0], "module") else ddp_chunks[0].config
    no_syncs = [chunk.no_sync for chunk in ddp_chunks]

    @contextlib.contextmanager
    def no_sync():
        with contextlib.ExitStack() as stack:
            for ctx in no_syncs:
                stack.enter_context(ctx())
            yield

    config.no_sync_func = no_sync if len(ddp_chunks) > 1 else no_syncs[0]
    config.finalize_model_grads_func = finalize_model_grads


# ---- Adam state, whole per parameter, for checkpoints ----

def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(sub) -> bool:
    return hasattr(sub, "model_param_gbuf_map")


def _model_params(sub) -> list[torch.nn.Parameter]:
    """The model parameters one megatron optimizer updates, in the same order on every rank."""
    if _is_distributed(sub):  # all of its buffers' weights, not only those with a shard here
        return [p for buffer in sub.buffers for p in buffer.params]
    return [p for group in sub.optimizer.param_groups for p in group["params"]]


def adam_state(optimizer) -> Mapping[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """Adam's state per model parameter, whole ({exp_avg, exp_avg_sq, step}), gathered from the
    data-parallel shards of megatron's optimizer (collective over the data-parallel ranks)."""
    state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for sub in _sub_optimizers(optimizer):
        if not _is_distributed(sub):
            state.update({p: sub.optimizer.state[p] for p in _model_params(sub) if p in sub.optimizer.state})
            continue
        for param in _model_params(sub):
            full = {k: torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
                    for k in ("exp_avg", "exp_avg_sq")}
            step = torch.zeros((), dtype=torch.float32)
            if param in sub.model_param_group_index_map:
                shard = sub._get_model_param_range_map(param)["param"]
                local = sub._get_main_param_and_optimizer_states(param)
                if "exp_avg" in local:
                    for k in full:
                        full[k][shard.start:shard.end] = local[k]
                    step.fill_(float(sub.optimizer.state[local["param"]]["step"]))
            flat = torch.cat([full["exp_avg"], full["exp_avg_sq"]])
            dist.all_reduce(flat, group=sub.data_parallel_group)
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=sub.data_parallel_group)
            if step > 0:
                n = param.numel()
                state[param] = {"step": step, "exp_avg": flat[:n].view_as(param),
                                "exp_avg_sq": flat[n:].view_as(param)}
    return state


def load_adam_state(optimizer, state: Mapping[torch.nn.Parameter, dict[str, torch.Tensor]]) -> None:
    """Set Adam's state from whole per-parameter tensors (as `adam_state` returns them)."""
    for sub in _sub_optimizers(optimizer):
        for param in _model_params(sub):
            if param not in state:
                continue
            entries = state[param]
            if not _is_distributed(sub):
                sub.optimizer.state[param] = {k: v.clone() for k, v in entries.items()}
                continue
            if param not in sub.model_param_group_index_map:
                continue  # no shard of this parameter on this rank
            shard = sub._get_model_param_range_map(param)["param"]
            group_index, order = sub.model_param_group_index_map[param]
            main = sub.optimizer.param_groups[group_index]["params"][order]
            sub.optimizer.state[main] = {
                "step": entries["step"].clone().float().reshape(()),
                **{k: entries[k].reshape(-1)[shard.start:shard.end].clone().to(main.device)
                   for k in ("exp_avg", "exp_avg_sq")}}


def describe(optimizer, cfg: Config) -> str:
    """One log line: how gradients are reduced and how much of the Adam state this rank holds."""
    held = total = 0
    for sub in _sub_optimizers(optimizer):
        params = _model_params(sub)
        total += sum(p.numel() for p in params)
        if _is_distributed(sub):
            held += sum(len(sub._get_model_param_range_map(p)["param"]) for p in params
                        if p in sub.model_param_group_index_map)
        else:
            held += sum(p.numel() for p in params)
    p = cfg.parallel
    mode = "distributed optimizer" if p.distributed_optimizer else "replicated optimizer"
    overlap = ", gradient reduction overlapped with the backward" if p.overlap_grad_reduce else ""
    return (f"data parallel: megatron-core DDP, {mode}{overlap}; Adam state for {held:,} of "
            f"{total:,} weights on this rank")
