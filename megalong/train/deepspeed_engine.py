"""The DeepSpeed engine (`train.engine: deepspeed`): ZeRO stages 1-3, optionally with the optimizer
state offloaded to CPU memory, around the same megatron-core model (tensor parallel as configured).

DeepSpeed replaces megalong's data parallelism and optimizer step: it shards the optimizer state
(ZeRO-1), also the gradients (ZeRO-2), also the weights (ZeRO-3) over the data-parallel ranks of
megatron-core's groups (handed to it as `mpu`, so tensor-parallel ranks hold different slices and
the gradient norm is summed over them). The model, its initial weights, the data order, the
learning-rate schedule and the AdamW parameter groups are the megatron engine's, so both engines
give the same losses (tests/test_deepspeed.py).

Supported: any tensor-parallel size, data parallelism, MoE layers with parallel.expert: 1 at ZeRO-1
and ZeRO-2, fp32 and bf16 (DeepSpeed's bf16 mode: bf16 weights with fp32 master weights),
train.nonfinite: stop, and skip at ZeRO-1 and ZeRO-2 (whose optimizer drops a step with a
non-finite gradient norm itself; ZeRO-3 applies it, so skip is refused there). Refused by the
config validator: pipeline stages, expert parallelism, ZeRO-3 with MoE layers (the backward
pass met expert weights ZeRO-3 had not gathered). bf16 ran on the CPU at ZeRO-1 and ZeRO-2, DP=2
(tests/test_bf16.py: ZeRO-2 beside fp32). The model is built whole on every process
before ZeRO-3 partitions it (deepspeed.zero.Init is not used), so ZeRO-3 saves memory during
training but not while building.

Environment: without CUDA a DeepSpeed run sets DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo)
before importing DeepSpeed, unless it is set already (megalong/compat/deepspeed_cpu.py), and turns off DeepSpeed's shared-memory CPU
all-reduce op (`deepspeed_shm_comm`), which DeepSpeed would otherwise compile with ninja on the first
`deepspeed.initialize` of every machine (minutes on a small CPU, and a stale build lock left by a
killed process hangs later runs); torch.distributed's gloo does the communication. The optimizer is torch's AdamW in every
mode, also with CPU offload (`zero_force_ds_cpu_optimizer: false`), so no DeepSpeed C++/CUDA op
is compiled: install with `DS_BUILD_OPS=0` (the default) and nothing is built.

Checkpoints (`<save_dir>/step_XXXXXXXX/`, written under a temporary name and renamed when
complete, like the megatron engine's): `deepspeed/` (DeepSpeed's own files: module, ZeRO shards of
the optimizer state), `model_tpXX.safetensors` (whole weights of each tensor-parallel rank,
gathered from the ZeRO-3 shards, for `megalong export`/`generate`), RNG states, config, tokenizer
and meta.json (with `"engine": "deepspeed"`). Resuming needs the same ZeRO stage and layout.
DeepSpeed's own files are pickles, which DeepSpeed 0.19.8 reads with `torch.load(weights_only=
False)`: megalong lets it read them only inside megalong/train/library_loads.py's
`pickles_without_code()` (weights_only forced, DeepSpeed's four classes allowed), so they never
run code either.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong import compat
from megalong.config import Config, ConfigError, deep_merge, validate
from megalong.model.gpt import build_model, model_flops_per_token
from megalong.model.tp_shard import partition_dims
from megalong.moe.layer import moe_aux_loss, update_router_biases
from megalong.parallel.distributed import ParallelLayout, initialize
from megalong.preflight import check_train_inputs
from megalong.train import checkpoint as ckpt
from megalong.train.batches import fetch, micro_batch_indices
from megalong.train.metrics import Throughput, format_duration, memory_gib
from megalong.train.nonfinite import NonFiniteGuard
from megalong.train.optim import build_optimizer
from megalong.train.schedule import learning_rate

DEEPSPEED_TAG = "deepspeed"  # the sub-directory of a step directory holding DeepSpeed's files


class MegatronMpu:
    """megatron-core's process groups under the names DeepSpeed asks an `mpu` for."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)


def deepspeed_config(cfg: Config, data_parallel: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run: derived from the train section and `deepspeed:`, plus
    the extra keys of deepspeed.config (which may not override the derived ones)."""
    t, d = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    derived = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * data_parallel),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": cfg.execution.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # megalong's AdamW (torch's), in every ZeRO stage
        "zero_force_ds_cpu_optimizer": False,  # ... also with CPU offload: no C++ op to build
        "steps_per_print": 2**31 - 1,  # megalong logs
    }
    return deep_merge(d.config, derived)


def _gathered(engine, params):
    """Context in which ZeRO-3's partitioned parameters are whole (a no-op for stages 1-2)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), enabled=engine.zero_optimization_stage() == 3)


def save_checkpoint(save_dir: str | Path, step: int, cfg: Config, engine, layout: ParallelLayout,
                    tokenizer_path: str, tokenizer_vocab_size: int,
                    resumed_from: Path | None = None) -> Path:
    """Save on every rank (collective); returns the final step directory."""
    tmp, final = ckpt.begin_checkpoint(Path(save_dir), step, layout.rank)
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
    module = engine.module
    with _gathered(engine, module.parameters()):
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        dims = partition_dims(module)
    if layout.data_rank == 0:  # one copy per tensor-parallel rank
        ckpt.write_tensors(tmp / f"model_tp{layout.tensor_rank:02d}.safetensors", state)
    ckpt.save_rng(ckpt.rng_file(tmp, layout.rank))
    dist.barrier()
    if layout.rank == 0:
        meta = {"step": step, "format": "megalong", "engine": "deepspeed",
                "zero_stage": cfg.deepspeed.zero_stage,
                "tensor_parallel": layout.tensor_parallel, "data_parallel": layout.data_parallel,
                "expert_parallel": 1, "pipeline_parallel": 1, "world_size": layout.world_size,
                "tokenizer_vocab_size": tokenizer_vocab_size,
                "gated_mlp": cfg.model.gated_mlp, "partition_dims": dims}
        ckpt.finish_checkpoint(tmp, final, cfg, tokenizer_path, meta, resumed_from)
    dist.barrier()
    return final


def _deepspeed_files(engine, layout: ParallelLayout) -> list[str]:
    """The files (glob patterns) DeepSpeed 0.19.8 reads on this rank: its model states, and the
    ZeRO optimizer states of every data-parallel rank (`bf16_` prefixed in its bf16 mode)."""
    tp = f"mp_rank_{layout.tensor_rank:02d}"
    model = (f"zero_pp_rank_{layout.data_rank}_{tp}_model_states.pt" if engine.zero_optimization_stage() == 3
             else f"{tp}_model_states.pt")
    return [model, *(f"*zero_pp_rank_{d}_{tp}_optim_states.pt" for d in range(layout.data_parallel))]


def _load_engine_files(engine, step_dir: Path, layout: ParallelLayout) -> None:
    """DeepSpeed's own files, read through megalong/train/library_loads.py: weights_only=True with
    DeepSpeed's few classes allowed; a file it cannot read is a CheckpointError naming it."""
    from megalong.train.library_loads import deepspeed_safe_globals, describe_load_error, pickles_without_code

    directory = step_dir / DEEPSPEED_TAG
    for name in _deepspeed_files(engine, layout):
        if not list(directory.glob(name)):
            raise ckpt.CheckpointError(f"{directory / name.lstrip('*')}: missing (the checkpoint is incomplete)")
    reader = engine.checkpoint_engine
    read = reader.load

    def load_naming_the_file(path, map_location=None):
        if not os.path.isfile(path):
            raise ckpt.CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
        try:
            return read(path, map_location=map_location)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise ckpt.CheckpointError(f"{path}: {describe_load_error(e)}") from None

    reader.load = load_naming_the_file
    try:
        with pickles_without_code(deepspeed_safe_globals()):
            engine.load_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    except ckpt.CheckpointError:
        raise
    except Exception as e:  # DeepSpeed asserts on files that do not fit (another layout, ...)
        raise ckpt.CheckpointError(f"{directory}: DeepSpeed cannot load it "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    finally:
        del reader.load  # the engine's own method again


def load_checkpoint(path: Path, cfg: Config, engine, layout: ParallelLayout) -> int:
    """Restore weights, ZeRO optimizer state and RNG state; returns the step to continue from."""
    info = ckpt.read_checkpoint_info(path)
    ckpt.check_compatible(info.config, cfg, info.path)
    meta = info.meta
    if meta.get("engine") != "deepspeed":
        raise ckpt.CheckpointError(f"checkpoint {info.path} was written by the megatron engine; "
                                   f"resume it with train.engine: megatron")
    for key, now in (("zero_stage", cfg.deepspeed.zero_stage), ("data_parallel", layout.data_parallel),
                     ("tensor_parallel", layout.tensor_parallel)):
        if meta[key] != now:
            raise ckpt.CheckpointError(f"checkpoint {info.path} has {key}={meta[key]} but this run has "
                                       f"{now}; DeepSpeed resumes only at the same ZeRO stage and layout")
    _load_engine_files(engine, info.path, layout)
    ckpt.restore_rng(info, layout)
    return int(meta["step"])


def _mean_over_data_parallel(value: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_data_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    return value


def train(cfg: Config):
    """Train as configured with DeepSpeed; every process of a torchrun/deepspeed job calls this.
    Returns the megatron engine's TrainResult."""
    compat.install(deepspeed=True)  # before DeepSpeed is imported: its CPU accelerator, no op builds
    import deepspeed

    from megalong.data.tokenizer import SentencePieceTokenizer
    from megalong.train.loop import TrainResult, _build_datasets, evaluate, lm_loss, open_reporter

    t = cfg.train
    layout = initialize(cfg.parallel.tensor, cfg.parallel.backend)
    validate(cfg, world_size=layout.world_size)
    check_train_inputs(cfg)
    ckpt.prepare_save_dir(cfg, layout.rank)  # train.overwrite: true deletes them, after every check
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} pieces of data.tokenizer {cfg.data.tokenizer}")

    torch.manual_seed(t.seed)  # the megatron engine's initial weights, whatever the layout
    model = build_model(cfg, tokenizer.vocab_size).to(layout.device)
    vocab_size = model.vocab_size
    optimizer = build_optimizer(model, t)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MegatronMpu(),
                                           config=deepspeed_config(cfg, layout.data_parallel))
    start_step = 0
    resume = ckpt.resume_path(cfg)
    if resume is not None:
        start_step = load_checkpoint(resume, cfg, engine, layout)
    else:
        torch.manual_seed(t.seed + 1 + layout.data_rank)  # dropout differs across DP replicas

    train_set, valid_set, _ = _build_datasets(cfg, tokenizer)
    n_micro = engine.gradient_accumulation_steps()
    end_step = min(t.train_steps, t.stop_at_step or t.train_steps)
    throughput = Throughput(t.global_batch_size * cfg.seq_length, model_flops_per_token(cfg, vocab_size),
                            t.peak_tflops * 1e12 * layout.world_size)
    reporter = open_reporter(cfg, layout, start_step, end_step)
    reporter.line(f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}"
                  f"{' with CPU optimizer offload' if cfg.deepspeed.offload_optimizer else ''}: "
                  f"{layout.world_size} processes (tensor {layout.tensor_parallel} x data "
                  f"{layout.data_parallel}) on {layout.device.type}")
    if resume is not None:
        reporter.line(f"resumed from {resume} at step {start_step}")

    result = TrainResult()
    guard = NonFiniteGuard(t.nonfinite, t.max_skipped_steps, resume)
    engine.train()
    for step in range(start_step, end_step):
        lr = learning_rate(step, t)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        lm_total = torch.zeros((), device=layout.device)
        for idx in micro_batch_indices(step, t.global_batch_size, t.micro_batch_size,
                                       layout.data_parallel, layout.data_rank):
            loss = lm_loss(engine, fetch(train_set, idx, layout.device))
            aux = moe_aux_loss(engine.module)
            engine.backward(loss + aux if aux is not None else loss)  # scaled by 1/n_micro inside
            engine.step()  # the optimizer steps at the last micro-batch only
            lm_total += loss.detach() / n_micro
        # ZeRO-1/2 drop a step whose gradient norm is not finite (was_step_applied is then False)
        applied = engine.was_step_applied()
        update_router_biases(engine.module, torch.tensor(float(applied)))
        throughput.step_done()
        done = step + 1
        loss_value = float(_mean_over_data_parallel(lm_total))
        norm = engine.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else float("nan")
        result.losses[done], result.grad_norms[done] = loss_value, norm_value
        record = {"train/loss": loss_value, "train/grad_norm": norm_value, "train/lr": lr}
        try:
            skipped = guard.record(done, loss_value, norm_value, applied)
        finally:  # the metrics of the step that stops the run are written too
            if t.nonfinite == "skip":
                record["train/skipped_steps"] = guard.skipped_total
            reporter.scalars(done, record)
        if skipped is not None:
            reporter.line(skipped)
        if done % t.log_interval == 0 or done == end_step:
            tokens_per_s, mfu = throughput.window()
            result.tokens_per_second = tokens_per_s
            reporter.line(f"step {done}/{end_step} | loss {loss_value:.4f} | lr {lr:.3e} | grad norm "
                          f"{norm_value:.3f} | {tokens_per_s:,.0f} tokens/s | MFU {100 * mfu:.2f}% | "
                          f"mem {memory_gib(layout.device):.2f} GiB | "
                          f"ETA {format_duration(throughput.eta(end_step - done))}")
        reporter.advance({"loss": f"{loss_value:.3f}"})
        if valid_set is not None and done % t.eval_interval == 0 and done != end_step:
            result.valid_losses[done] = evaluate(engine, valid_set, cfg, layout)
            reporter.line(f"step {done}: held-out loss {result.valid_losses[done]:.4f}")
            reporter.scalars(done, {"valid/loss": result.valid_losses[done]})
        if t.save_dir and t.save_interval and done % t.save_interval == 0 and done != end_step:
            if guard.may_save:
                guard.last_checkpoint = save_checkpoint(t.save_dir, done, cfg, engine, layout,
                                                        cfg.data.tokenizer, tokenizer.vocab_size, resume)
            else:
                reporter.line(f"step {done}: no checkpoint written: the last {guard.streak} steps were "
                              f"skipped (train.nonfinite: skip)")

    if valid_set is not None:
        result.final_valid_loss = evaluate(engine, valid_set, cfg, layout)
        result.valid_losses[end_step] = result.final_valid_loss
        reporter.scalars(end_step, {"valid/loss": result.final_valid_loss})
        reporter.line(f"held-out loss {result.final_valid_loss:.4f} after {end_step} steps")
    if t.save_dir:
        result.checkpoint = save_checkpoint(t.save_dir, end_step, cfg, engine, layout,
                                            cfg.data.tokenizer, tokenizer.vocab_size, resume)
        reporter.line(f"saved {result.checkpoint}")
    reporter.close()
    return result

