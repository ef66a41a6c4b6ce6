"""Validation of `parallel.context` (context parallelism, megalong/parallel/context.py): the
sizes it must divide, and every combination it does not support yet, refused by name."""
from __future__ import annotations

from megalong.config.check_model import positive
from megalong.config.errors import ConfigError
from megalong.config.schema import Config

CONTEXT_KINDS = ("global", "local", "linear", "lsh", "axial", "fam")  # kinds with an attend_context


def axial_cols(options: object) -> int:
    shape = getattr(options, "axial_shape", None)
    return shape[1] if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0 else 1


def validate_context(cfg: Config, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    n = p.context
    positive(n, "parallel.context")
    if n == 1:
        return
    if cfg.seq_length % n:
        raise ConfigError(f"parallel.context: {n} does not divide the sequence length {cfg.seq_length}")
    if p.context_layout == "zigzag":
        others = sorted(set(cfg.layer_kinds()) - {"global"})
        if others:
            raise ConfigError(f"parallel.context_layout: zigzag needs every attention layer global "
                              f"(model.attention_layers has {', '.join(others)})")
        if cfg.seq_length % (2 * n):
            raise ConfigError(f"parallel.context_layout: zigzag cuts the sequence into 2 x {n} pieces, "
                              f"which do not divide the sequence length {cfg.seq_length}")
    if world_size % (p.tensor * p.pipeline * n):
        raise ConfigError(f"parallel.context: parallel.tensor x parallel.pipeline x parallel.context = "
                          f"{p.tensor} x {p.pipeline} x {n} does not divide the {world_size} processes")
    chunk = cfg.seq_length // n
    refused: list[tuple[bool, str]] = []
    for kind in sorted(set(cfg.layer_kinds())):
        options = cfg.attention_options(kind)
        refused += [
            (kind not in CONTEXT_KINDS, f"{kind} attention (model.attention_layers)"),
            (kind == "global" and m.attention_dropout > 0, "model.attention_dropout with global attention "
             "(ring attention)"),
            (kind == "local" and bool(getattr(options, "global_tokens", 0)) and m.attention_dropout > 0,
             "model.attention_dropout with model.attention.local.global_tokens"),
            (kind == "fam" and chunk % getattr(options, "block_size", 1) != 0,
             f"a chunk of {chunk} tokens that is not whole blocks of model.attention.fam.block_size"),
            (kind == "axial" and chunk % axial_cols(options) != 0,
             f"a chunk of {chunk} tokens that is not whole rows of model.attention.axial.axial_shape"),
        ]
    for bad, what in refused:
        if bad:
            raise ConfigError(f"parallel.context: {n} does not support {what} yet")
