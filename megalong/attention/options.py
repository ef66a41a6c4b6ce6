"""Per-kind attention options: the keys a config may set under `model.attention.<kind>`.

The config builds one typed options object per kind when it is loaded (`Config.attention_options`)
and the model hands that object to the kind's module. What a kind supports (ALiBi, RoPE, an MoE
MLP) is said by class attributes here, so config validation never branches on kind names.
Kept free of torch so that the config can be validated before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional


class OptionError(ValueError):
    """An attention option that does not fit; the config names it as model.attention.<kind>.<key>."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class ModelShape:
    """What an attention kind's options are checked against (see `check`)."""

    seq_length: int
    num_heads: int
    head_dim: int
    tensor_parallel: int


@dataclass
class AttentionOptions:
    """Base of every kind's options: capability flags and the checks config validation calls."""

    supports_alibi: ClassVar[bool] = True  # has attention scores for ALiBi to bias
    supports_rope: ClassVar[bool] = True  # every token has a position for RoPE to rotate q and k by
    dense_mlp_only: ClassVar[bool] = False  # its layer's MLP must be dense (not moe)
    # attend_documents: packed documents kept apart (data.document_mask, megalong/attention/segments.py)
    supports_document_mask: ClassVar[bool] = False

    def check(self, shape: ModelShape) -> None:
        """Raise OptionError for a value that does not fit the sequence length or the layout."""

    def attended_keys(self, shape: ModelShape) -> float:
        """Keys one query attends to on average (its FLOPs): the causal triangle by default."""
        return (shape.seq_length + 1) / 2


@dataclass
class GlobalOptions(AttentionOptions):
    """Full causal attention: every token sees itself and everything before it."""

    supports_document_mask: ClassVar[bool] = True


@dataclass
class LocalOptions(AttentionOptions):
    """Causal sliding window: a token sees itself and the previous `window - 1` tokens (GPT-Neo).

    `dilation`: one integer for every head or a list with one per head (global head index): a head
    with dilation d sees keys i, i-d, ..., i-(window-1)d. `global_tokens`: k (the first k positions)
    or a list of positions; these attend to everything before them and every later token attends to
    them, through their own q/k/v projections (Longformer, local.py).
    """

    supports_document_mask: ClassVar[bool] = True

    window: int = 256
    dilation: Any = 1  # int or list of ints, one per head
    global_tokens: Any = 0  # int k (positions 0..k-1) or a list of positions

    def check(self, shape: ModelShape) -> None:
        if self.window < 1:
            raise OptionError("window", f"must be >= 1, got {self.window}")
        dilations = self.dilation if isinstance(self.dilation, list) else [self.dilation]
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
            raise OptionError("dilation", f"expected an integer >= 1 or a list of them, got {self.dilation!r}")
        if isinstance(self.dilation, list) and len(self.dilation) != shape.num_heads:
            raise OptionError("dilation", f"a list needs one entry per attention head: got {len(self.dilation)} "
                                          f"for {shape.num_heads} heads (model.num_attention_heads)")
        g = self.global_tokens
        if isinstance(g, bool) or not isinstance(g, (int, list)):
            raise OptionError("global_tokens", f"expected a count k (the first k positions) or a list of "
                                               f"positions, got {g!r}")
        if isinstance(g, int) and not 0 <= g <= shape.seq_length:
            raise OptionError("global_tokens", f"{g} must be between 0 and the sequence length {shape.seq_length}")
        if isinstance(g, list):
            if any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < shape.seq_length for p in g):
                raise OptionError("global_tokens", f"positions must be integers in [0, {shape.seq_length}) "
                                                   f"(the sequence length), got {g!r}")
            if len(set(g)) != len(g):
                raise OptionError("global_tokens", f"positions repeat: {g!r}")

    def attended_keys(self, shape: ModelShape) -> float:
        """Keys per query, for FLOP counts: the window and the global tokens."""
        return min(self.window, shape.seq_length) + len(self.global_positions())

    def global_positions(self) -> list[int]:
        """The global token positions, sorted."""
        g = self.global_tokens
        return list(range(g)) if isinstance(g, int) else sorted(g)


@dataclass
class LinearOptions(AttentionOptions):
    """Causal linear attention (linear.py): `normalization: elu` is Katharopoulos et al.'s
    phi(x) = elu(x) + 1 with `eps` in the denominator; `efficient` is Shen et al.'s softmax over
    features for queries and over the positions seen so far for keys. Computed in chunks of
    `chunk_size` positions (the result does not depend on it)."""

    normalization: Literal["elu", "efficient"] = "elu"
    eps: float = 1e-6
    chunk_size: int = 64
    supports_alibi: ClassVar[bool] = False  # no attention scores to bias
    supports_document_mask: ClassVar[bool] = True

    def attended_keys(self, shape: ModelShape) -> float:
        """Per token: a state update and a read of head_dim x head_dim, about head_dim keys' work."""
        return shape.head_dim

    def check(self, shape: ModelShape) -> None:
        if self.chunk_size < 1:
            raise OptionError("chunk_size", f"must be >= 1, got {self.chunk_size}")
        if self.eps < 0:
            raise OptionError("eps", f"must be >= 0, got {self.eps}")


@dataclass
class AxialOptions(AttentionOptions):
    """Axial attention (axial.py): the sequence folded row by row into `axial_shape: [rows, cols]`
    (rows x cols = the sequence length), attention along its row and its column, causal."""

    supports_document_mask: ClassVar[bool] = True

    axial_shape: Optional[list] = None

    def check(self, shape: ModelShape) -> None:
        a = self.axial_shape
        if (not isinstance(a, list) or len(a) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in a)):
            raise OptionError("axial_shape", f"expected [rows, cols], two positive integers, got {a!r}")
        if a[0] * a[1] != shape.seq_length:
            raise OptionError("axial_shape", f"{a[0]} x {a[1]} = {a[0] * a[1]} is not the sequence "
                                             f"length {shape.seq_length}")

    def attended_keys(self, shape: ModelShape) -> float:
        """The whole row (row summaries), then on average half the row and half the column."""
        if self.axial_shape is None:
            raise OptionError("axial_shape", "missing: [rows, cols]")
        rows, cols = self.axial_shape
        return cols + (rows + cols) / 2


@dataclass
class LshOptions(AttentionOptions):
    """Reformer LSH attention: `n_hashes` rounds of buckets, chunks of `bucket_size` (lsh.py).

    `n_buckets`: hash buckets per round. null (default): one per chunk of the sequence being run,
    so a sequence of another length (generation, evaluation at a new length) hashes with other
    rotations than training did. A number (1 or even; e.g. seq_length / bucket_size of training)
    fixes the hashing whatever the length, as Reformer/trax configure n_buckets explicitly.
    """

    supports_document_mask: ClassVar[bool] = True

    n_hashes: int = 2
    bucket_size: int = 64
    seed: int = 0  # with the layer and the global head index, fixes the random rotations
    n_buckets: Optional[int] = None

    def attended_keys(self, shape: ModelShape) -> float:
        """Scores computed per query: its chunk and the one before, in every round."""
        return self.n_hashes * 2 * min(self.bucket_size, shape.seq_length)

    def check(self, shape: ModelShape) -> None:
        if self.n_hashes < 1:
            raise OptionError("n_hashes", f"must be >= 1, got {self.n_hashes}")
        if self.bucket_size < 1:
            raise OptionError("bucket_size", f"must be >= 1, got {self.bucket_size}")
        if self.bucket_size > shape.seq_length or shape.seq_length % self.bucket_size:
            raise OptionError("bucket_size", f"{self.bucket_size} does not divide the sequence length "
                                             f"{shape.seq_length}")
        chunks = shape.seq_length // self.bucket_size
        if self.n_buckets is not None:
            if self.n_buckets < 1 or (self.n_buckets > 1 and self.n_buckets % 2):
                raise OptionError("n_buckets", f"must be 1 or an even number (h(x) = argmax([xR; -xR])), "
                                               f"got {self.n_buckets}")
        elif chunks > 1 and chunks % 2:
            raise OptionError("bucket_size", f"the sequence length {shape.seq_length} makes {chunks} "
                                             "buckets; LSH needs one or an even number (or set n_buckets)")


@dataclass
class FamOptions(AttentionOptions):
    """TransformerFAM: blocks of `block_size`, `memory_segments` previous blocks, `fam_length`
    feedback-memory tokens per layer (0: block sliding-window attention without FAM) (fam.py)."""

    supports_rope: ClassVar[bool] = False  # FAM tokens have no position to rotate by
    supports_document_mask: ClassVar[bool] = True
    dense_mlp_only: ClassVar[bool] = True  # FAM tokens pass the MLP once per block

    block_size: int = 256
    memory_segments: int = 1
    fam_length: int = 64

    def attended_keys(self, shape: ModelShape) -> float:
        """Per block token: memory blocks, FAM and own block; plus the FAM queries' share."""
        B, F = self.block_size, self.fam_length
        return (self.memory_segments + 1) * B + F + F * (F + B) / B

    def check(self, shape: ModelShape) -> None:
        if self.block_size < 1:
            raise OptionError("block_size", f"must be >= 1, got {self.block_size}")
        if self.block_size > shape.seq_length or shape.seq_length % self.block_size:
            raise OptionError("block_size", f"{self.block_size} does not divide the sequence length "
                                            f"{shape.seq_length}")
        if self.memory_segments < 0:
            raise OptionError("memory_segments", f"must be >= 0, got {self.memory_segments}")
        if self.memory_segments >= max(1, shape.seq_length // self.block_size):
            raise OptionError("memory_segments", f"{self.memory_segments} previous blocks do not fit in "
                                                 f"{shape.seq_length // self.block_size} blocks of the "
                                                 "sequence")
        if self.fam_length < 0:
            raise OptionError("fam_length", f"must be >= 0, got {self.fam_length}")


ATTENTION_OPTIONS: dict[str, type[AttentionOptions]] = {
    "global": GlobalOptions,
    "local": LocalOptions,
    "lsh": LshOptions,
    "fam": FamOptions,
    "linear": LinearOptions,
    "axial": AxialOptions,
}
