"""Logits of imported checkpoints loaded at other layouts, for tests/test_import.py: run under
`torch.distributed.run --nproc_per_node 2 tests/import_driver.py CASES.json`, where CASES.json is a
list of {"checkpoint", "tensor", "pipeline", "tokens", "out"}. Each case builds the model at that
layout, loads the checkpoint through megalong's native format and writes the whole logits
(gathered over tensor-parallel ranks, from the last pipeline stage) to `out` (safetensors)."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from megalong.checkpoint.native import load_model_files
from megalong.checkpoint.step import read_checkpoint_info
from megalong.config import config_from_dict
from megalong.model.gpt import build_model_chunks
from megalong.parallel.distributed import initialize, shutdown


def logits_at(case: dict) -> None:
    info = read_checkpoint_info(case["checkpoint"])
    raw = info.config.to_dict()
    raw["parallel"].update({"tensor": case["tensor"], "pipeline": case["pipeline"]})
    cfg = config_from_dict(raw)
    layout = initialize(case["tensor"], pipeline_parallel=case["pipeline"])
    chunks = build_model_chunks(cfg, info.meta["tokenizer_vocab_size"])
    load_model_files(info, cfg, chunks, layout)
    model = chunks[0].eval()
    tokens = load_file(case["tokens"])["tokens"]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if layout.pipeline_parallel > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            ranks = dist.get_process_group_ranks(group)
            if layout.pipeline_rank == 0:
                dist.send(model(tokens, positions, None).contiguous(), ranks[1])
                return
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], cfg.model.hidden_size)
            dist.recv(hidden, ranks[0])
            model.set_input_tensor(hidden)
        logits = model(tokens, positions, None)
        if layout.tensor_parallel > 1:
            parts = [torch.empty_like(logits) for _ in range(layout.tensor_parallel)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
    if layout.tensor_rank == 0:
        save_file({"logits": logits.contiguous()}, case["out"])


def main(path: str) -> None:
    for case in json.loads(open(path).read()):
        logits_at(case)
        dist.barrier()
        parallel_state.destroy_model_parallel()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
