"""Attention kinds by name: the only place that maps a config's kind to modules.

A kind is mostly a core-attention class (the `core_attention` slot of megatron's SelfAttention).
Kinds that need more than that replace a whole slot in their own entry, never by branching in
generic code: shared-QK or extra projections replace the `SelfAttention` class, extra tokens that
also pass the layer's MLP (FAM) replace the `TransformerLayer` class.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megalong.attention.base import CoreAttention
from megalong.attention.global_attention import GlobalAttention
from megalong.attention.local import LocalAttention, LocalSelfAttention
from megalong.attention.linear import LinearAttention
from megalong.attention.axial import AxialAttention
from megalong.attention.lsh import LshAttention, LshSelfAttention
from megalong.attention.fam import FamAttention, FamTransformerLayer
from megalong.attention.options import ATTENTION_OPTIONS, AttentionOptions


@dataclass(frozen=True)
class AttentionKind:
    core: type[CoreAttention]
    self_attention: type = SelfAttention
    layer: type = TransformerLayer


ATTENTION_KINDS: dict[str, AttentionKind] = {
    "global": AttentionKind(GlobalAttention),
    "local": AttentionKind(LocalAttention, self_attention=LocalSelfAttention),  # global tokens
    "lsh": AttentionKind(LshAttention, self_attention=LshSelfAttention),
    "fam": AttentionKind(FamAttention, layer=FamTransformerLayer),
    "linear": AttentionKind(LinearAttention),
    "axial": AttentionKind(AxialAttention),
}
CORE_ATTENTION: dict[str, type[CoreAttention]] = {k: v.core for k, v in ATTENTION_KINDS.items()}
if ATTENTION_KINDS.keys() != ATTENTION_OPTIONS.keys() or any(
        CORE_ATTENTION[kind].options_class is not options for kind, options in ATTENTION_OPTIONS.items()):
    raise ImportError("megalong.attention: options.py and registry.py must list the same kinds, "
                      "each module taking its kind's options class")


def core_attention_spec(kind: str, options: AttentionOptions, alibi: bool) -> ModuleSpec:
    """The ModuleSpec for the `core_attention` slot of the kind's self-attention: the typed
    options object reaches the module as it is."""
    return ModuleSpec(module=CORE_ATTENTION[kind], params={"alibi": alibi, "options": options})
