"""Process groups: torch.distributed plus megatron-core's parallel_state, for one process or many."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tensor_parallel: int
    tensor_rank: int
    data_parallel: int
    data_rank: int
    device: torch.device
    expert_parallel: int = 1
    expert_rank: int = 0
    expert_data_rank: int = 0
    pipeline_parallel: int = 1
    pipeline_rank: int = 0
    virtual_stages: int = 1
    context_parallel: int = 1
    context_rank: int = 0


def data_context_rank() -> int:
    """This process's rank among the data x context ranks (megatron-core's DDP and ZeRO reduce over them)."""
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def data_context_size() -> int:
    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def data_context_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(tensor_parallel: int, backend: str = "auto", expert_parallel: int = 1,
               pipeline_parallel: int = 1, virtual_stages: int = 1,
               context_parallel: int = 1) -> ParallelLayout:
    """Start torch.distributed (from torchrun's environment, or a one-process group) and
    megatron-core's model-parallel groups (context-parallel ones too). NCCL on GPUs, gloo on the CPU (where pipeline stages
    need megalong/compat/cuda_on_cpu.py, installed here)."""
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        # With expert parallelism, experts are whole (not sliced by TP): expert-tensor size 1, so the
        # expert-data-parallel group is every rank holding the same experts, TP peers included.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=1 if expert_parallel > 1 else None,
            pipeline_model_parallel_size=pipeline_parallel, context_parallel_size=context_parallel,
            virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        from megalong import compat

        compat.install(cuda_on_cpu=True)
    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        data_parallel=parallel_state.get_data_parallel_world_size(),
        data_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        expert_parallel=parallel_state.get_expert_model_parallel_world_size(),
        expert_rank=parallel_state.get_expert_model_parallel_rank(),
        expert_data_rank=parallel_state.get_expert_data_parallel_rank(),
        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        virtual_stages=parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        context_parallel=parallel_state.get_context_parallel_world_size(),
        context_rank=parallel_state.get_context_parallel_rank(),
    )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
