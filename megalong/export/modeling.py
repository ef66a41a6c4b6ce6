"""megalong models as Hugging Face models: `MegalongConfig` / `MegalongForCausalLM`, registered
with transformers' Auto classes, for the models GPT-Neo and Mixtral cannot express.

The module tree mirrors megatron-core's parameter names, so an exported state dict is megalong's
merged state dict as it is, and the attention and MoE modules are megalong's own, run without
process groups: the Hugging Face model computes what megalong computes.

Kinds whose registry entry replaces megatron's SelfAttention or TransformerLayer have a
counterpart here, found by that class (`HF_SELF_ATTENTION`, `HF_LAYER`), never by the kind's name.

Generation keeps a `MegalongCache`: per layer, whatever the layer's attention keeps between steps
(`CoreAttention.decode`: a key/value cache for global and local layers, the recurrent state of
linear layers, the context's q/k/v otherwise); a layer class with no incremental form
(`incremental = False`, e.g. fam) keeps its inputs and is run again on the whole context.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megalong.attention.registry import ATTENTION_KINDS
from megalong.config import Config, config_from_dict, migrate_saved_config
from megalong.export.hf_layers import HF_LAYER, hf_counterpart, norm

# The name transformers gives the cache in model outputs and generation's model inputs: `cache`
# from 5.x on (the old `past_key_values` still works there, with a deprecation warning).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MegalongConfig(PretrainedConfig):
    model_type = "megalong"

    def __init__(self, megalong_model: Optional[dict] = None, vocab_size: int = 0, **kwargs):
        self.megalong_model = megalong_model or {}
        self.vocab_size = vocab_size
        model = self.megalong_model
        self.hidden_size = model.get("hidden_size", 0)
        self.num_hidden_layers = model.get("num_layers", 0)
        self.num_attention_heads = model.get("num_attention_heads", 0)
        kwargs.setdefault("tie_word_embeddings", model.get("tie_embeddings", True))
        super().__init__(**kwargs)

    def megalong_config(self) -> Config:
        return config_from_dict(migrate_saved_config({"model": self.megalong_model}))


class Embedding(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.word_embeddings = nn.Embedding(vocab_size, m.hidden_size)
        if m.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(m.max_position_embeddings, m.hidden_size)
        elif m.position_embedding == "axial":
            from megalong.model.axial_position import AxialPositionEmbedding

            self.position_embeddings = AxialPositionEmbedding(m.axial_position.shape, m.hidden_size,
                                                              m.axial_position.mode)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(positions)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            hf_counterpart(ATTENTION_KINDS[kind].layer, HF_LAYER)(cfg, kind, mlp, i + 1)
            for i, (kind, mlp) in enumerate(zip(cfg.layer_kinds(), cfg.mlp_kinds())))
        self.final_layernorm = norm(cfg)

        # Generation keeps per-layer states up to the first layer that is not prefix-stable; from
        # there on it keeps that layer's inputs and reruns the rest of the stack on the context.
        self.first_unstable = next((i for i, layer in enumerate(self.layers) if not layer.prefix_stable),
                                   len(self.layers))
        # Reversible pairs (megalong/model/reversible.py): generation reruns the stack on the context.
        self.reversible_merge = cfg.model.reversible_merge if cfg.model.reversible else None
        if self.reversible_merge:
            self.first_unstable = 0

    def run_layers(self, layers, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`layers` on x without a cache: in turn, or as reversible pairs y1 = x1 + F(x2),
        y2 = x2 + G(y1) from x1 = x2 = x, merged as megalong's ReversibleTransformerBlock does."""
        if not self.reversible_merge:
            for layer in layers:
                x, _ = layer(x, positions)
            return x
        x1 = x2 = x / 2 if self.reversible_merge == "split" else x
        for layer in layers:
            if hasattr(layer, "reversible_attention"):  # fam: its FAM chain runs in the attention half
                x1 = x1 + layer.reversible_attention(x2)
            else:
                x1 = x1 + layer.self_attention(layer.input_layernorm(x2), positions, None, False)[0]
            out = layer.mlp(layer.pre_mlp_layernorm(x1))
            x2 = x2 + (out[0] if isinstance(out, tuple) else out)
        if self.reversible_merge == "mean":
            return (x1 + x2) / 2
        return x1 + x2 if self.reversible_merge == "split" else x2

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: Optional["MegalongCache"] = None) -> torch.Tensor:
        if cache is None:
            return self.final_layernorm(self.run_layers(self.layers, x, positions))
        first = self.first_unstable
        for i, layer in enumerate(self.layers[:first]):
            x, cache.layers[i] = layer(x, positions, cache.layers[i], use_cache=True)
        if first < len(self.layers):
            new = x.shape[0]
            kept = cache.layers[first]
            x = x if kept is None else torch.cat([kept["inputs"], x], dim=0)
            cache.layers[first] = {"inputs": x}
            whole = torch.arange(x.shape[0], device=x.device)
            x = self.run_layers(self.layers[first:], x, whole)[-new:]
        return self.final_layernorm(x)


class MegalongCache:
    """What generation keeps between steps: `seen` tokens so far and, per layer, its state."""

    def __init__(self, num_layers: int):
        self.layers: list[Optional[dict]] = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


# Keyword arguments through which Hugging Face code passes packed sequences (flash-attention varlen
# "padding-free" batches); megalong's export runs one document per row.
PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "packed_seq_params",
                   "segment_ids")


def refuse_packed_inputs(kwargs: dict, positions: torch.Tensor) -> None:
    """Raise on packed documents (position ids that restart inside a row, cu_seq_lens, segment
    ids) instead of silently letting the documents attend to each other."""
    given = sorted(k for k in PACKED_KEYWORDS if kwargs.get(k) is not None)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and not torch.equal(position_ids.to(positions.device),
                                                     positions.expand_as(position_ids)):
        given.append("position_ids")
    if given:
        raise ValueError(f"MegalongForCausalLM: packed sequences ({', '.join(given)}) are not supported: "
                         "give one document per row (megalong trains packed documents with data.document_mask)")


class MegalongForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegalongConfig
    base_model_prefix = "megalong"
    _no_split_modules = ["Layer"]

    def __init__(self, config: MegalongConfig):
        super().__init__(config)
        cfg = config.megalong_config()
        self.embedding = Embedding(cfg, config.vocab_size)
        self.decoder = Decoder(cfg)
        if not cfg.model.tie_embeddings:
            self.output_layer = nn.Linear(cfg.model.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: the model keeps a MegalongCache

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights always come from a megalong checkpoint

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[MegalongCache] = None,
                use_cache: Optional[bool] = None, past_key_values: Optional[MegalongCache] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of input_ids [b, s]; with a cache (`cache`, `past_key_values` before transformers
        5.x named it so, or a new one when use_cache), input_ids are the tokens after the
        `cache.seen` already given. Other keyword arguments transformers passes (cache_position,
        return_dict, ...) change nothing."""
        refuse_padding(attention_mask)
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = MegalongCache(len(self.decoder.layers))
        start = cache.seen if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        refuse_packed_inputs(kwargs, positions)
        x = self.embedding(input_ids, positions).transpose(0, 1)  # megatron layout [s, b, h]
        x = self.decoder(x, positions, cache).transpose(0, 1)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        head = self.output_layer.weight if hasattr(self, "output_layer") else self.embedding.word_embeddings.weight
        logits = F.linear(x, head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: Optional[MegalongCache] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      use_cache: Optional[bool] = None,
                                      past_key_values: Optional[MegalongCache] = None, **kwargs) -> dict:
        """With a cache only the tokens it has not seen; without, the whole context. The catch-all
        must be named `kwargs`: transformers passes through only a catch-all of that name, so
        `generate(**tokenizer(prompt, return_tensors="pt"))` can hand over its attention_mask."""
        refuse_padding(attention_mask)
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, CACHE_FIELD: cache, "use_cache": use_cache, "attention_mask": attention_mask}


def refuse_padding(attention_mask: Optional[torch.Tensor]) -> None:
    """Every attention kind here runs its rows from position 0 without masks: a padded row
    would attend to its padding, so batches with padding are refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("MegalongForCausalLM: padded batches (zeros in attention_mask) are not supported; "
                         "generate each prompt on its own, or batch prompts of equal length")


AutoConfig.register("megalong", MegalongConfig, exist_ok=True)
AutoModelForCausalLM.register(MegalongConfig, MegalongForCausalLM, exist_ok=True)
