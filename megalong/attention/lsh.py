"""`lsh` (Reformer, Kitaev et al. 2020): shared-QK attention over LSH buckets, O(L * bucket_size).

Keys are the length-normalised queries (`LshSelfAttention` projects only queries and values). Each
of `n_hashes` rounds hashes every query with a random rotation, h(x) = argmax([xR; -xR]), sorts the
tokens by (bucket, position), cuts the sorted order into chunks of `bucket_size`, and lets every
chunk attend to itself and the chunk before it (the first chunk of a round only to itself), under
the causal mask on the original positions. A token attends to itself only when nothing else is
visible to it in any round (the paper's self penalty). Rounds are combined by the paper's
log-sum-exp weights, with a pair seen in N rounds counted 1/N times per round, so the result is the
softmax over the union of the rounds' visible keys.

The number of buckets is the option `n_buckets` when set (hashing then does not depend on the
sequence length), else the number of chunks of the sequence being run (rounded up to an even count,
one bucket when the sequence fits one chunk). Rotations are fixed per (seed, layer, global head
index, round, number of buckets): reproducible, equal under any tensor-parallel split, and the same when a layer is run
again for its backward (recomputation, reversible layers).

Packed documents (`attend_documents`): hashing, sorting and chunks are those of the packed row; in
every round a pair is visible only when both tokens lie in one document (the torch chunk path runs;
the chunk kernel takes no segment ids). A token alone in its document's part of its chunks sees
itself, as any token with nothing else visible.

Context parallelism (`parallel.context`): every rank's queries and values all-gathered, this rank's
chunk of the one-process result kept (context_lsh.py).
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import Attention, SelfAttention

from megalong.attention import context_lsh
from megalong.attention.base import CoreAttention
from megalong.attention.options import LshOptions
from megalong.attention.segments import same_document
from megalong.kernels import select as kernels

# Score given to a token's own key: finite (so a row that sees nothing else stays defined), and so
# low that exp(score - logsumexp) is exactly 0 whenever any other key is visible.
SELF_SCORE = -1e5


def rotation_seed(seed: int, layer: int, head: int, round_: int, n_buckets: int) -> int:
    """A 63-bit generator seed for one head's rotation in one round (stable across processes)."""
    digest = hashlib.sha256(f"lsh/{seed}/{layer}/{head}/{round_}/{n_buckets}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def num_buckets(length: int, bucket_size: int) -> int:
    """Buckets for a sequence of `length`: one per chunk, even (h(x) has 2 * columns of R values)."""
    chunks = -(-length // bucket_size)
    return 1 if chunks == 1 else chunks + chunks % 2


class LshAttention(CoreAttention):
    """Core attention of `lsh`. Uses only `query` and `value`: keys are the normalised queries."""

    # The buckets depend on the sequence length and on later tokens: an earlier token's output
    # changes as the context grows, so generation reruns this layer (and those after it).
    prefix_stable = False

    options_class = LshOptions
    options: LshOptions

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        o = self.options
        self.n_hashes, self.bucket_size, self.seed, self.n_buckets = o.n_hashes, o.bucket_size, o.seed, o.n_buckets
        self._rotations: dict[tuple, torch.Tensor] = {}

    def buckets_for(self, length: int) -> int:
        """Hash buckets for a sequence of `length`: the `n_buckets` option, else one per chunk."""
        return self.n_buckets if self.n_buckets is not None else num_buckets(length, self.bucket_size)

    def rotations(self, n_buckets: int, head_dim: int) -> torch.Tensor:
        """[heads_on_this_rank, n_hashes, head_dim, n_buckets // 2] float64 random rotations."""
        key = (n_buckets, head_dim, self.n_hashes)
        if key not in self._rotations:
            per_head = []
            for h in range(self.first_head, self.first_head + self.heads_per_rank):
                rounds = []
                for r in range(self.n_hashes):
                    g = torch.Generator().manual_seed(rotation_seed(self.seed, self.layer_number, h, r, n_buckets))
                    rounds.append(torch.randn(head_dim, n_buckets // 2, generator=g, dtype=torch.float64))
                per_head.append(torch.stack(rounds))
            self._rotations[key] = torch.stack(per_head)
        return self._rotations[key]

    def hash(self, q: torch.Tensor, n_buckets: int) -> torch.Tensor:
        """Bucket of every query in every round: [b, h, n_hashes, L] int64."""
        b, h, L, d = q.shape
        if n_buckets == 1:
            return torch.zeros(b, h, self.n_hashes, L, dtype=torch.long, device=q.device)
        R = self.rotations(n_buckets, d).to(device=q.device, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
        rotated = torch.einsum("bhld,hrdk->bhrlk", q.to(R.dtype), R)
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.bucket_size
        # Triton on CUDA (megalong/kernels) for the chunk attention, when bucket_size is a power of
        # two >= 16 (with or without segment ids).
        fused = kernels.use_kernels(q, dropout=self.active_dropout) and c >= 16 and not c & (c - 1)
        b, h, L, d = q.shape
        Lp = -(-L // c) * c
        nb = self.buckets_for(L)
        n = self.n_hashes

        buckets = self.hash(q, nb)
        if Lp > L:  # padding sorts after every real token in every round, so it changes no chunk of theirs
            q, v = F.pad(q, (0, 0, 0, Lp - L)), F.pad(v, (0, 0, 0, Lp - L))
            buckets = F.pad(buckets, (0, Lp - L), value=nb)
        keys = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # shared-QK: normalised queries

        pos = torch.arange(Lp, device=q.device)
        order = torch.argsort(buckets * Lp + pos, dim=-1)  # [b, h, n, Lp]: sorted by (bucket, position)
        chunk_of = torch.empty_like(order).scatter_(-1, order, (pos // c).expand_as(order))

        def sort(x: torch.Tensor) -> torch.Tensor:  # [b, h, Lp, e] -> [b, h, n, Lp, e], each round's order
            idx = order.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
            return x.unsqueeze(2).expand(-1, -1, n, -1, -1).gather(3, idx)

        padded = None if segment_ids is None else F.pad(segment_ids, (0, Lp - L), value=-1)
        if fused:
            slopes = self.alibi_slopes(q.device, torch.float32) if self.alibi else None
            out, lse = chunk_kernel(sort(q), sort(keys), sort(v), order, chunk_of, c, self.scale, slopes, padded)
        else:
            out, lse = self.chunk_attention(sort(q), sort(keys), sort(v), order, chunk_of, padded)

        # Back to the original order, then rounds weighted by exp(lse_r - logsumexp_r lse_r).
        undo = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
        out = out.gather(3, undo.unsqueeze(-1).expand(-1, -1, -1, -1, d))
        lse = lse.gather(3, undo)
        weights = torch.softmax(lse, dim=2).to(out.dtype).unsqueeze(-1)
        return (out * weights).sum(dim=2)[:, :, :L]

    attend_documents = attend  # one implementation serves packed documents too

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Every rank's queries and values all-gathered, `attend` on the whole sequence, this
        rank's chunk kept (context_lsh.py). Keys are the queries: k is not sent."""
        return context_lsh.gathered_attention(self.attend, q, q, v, segment_ids)

    def chunk_attention(self, sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor, order: torch.Tensor,
                        chunk_of: torch.Tensor, segment_ids: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sorted chunk over itself and the chunk before, in torch (what `chunk_kernel`
        computes): sq, sk, sv [b, h, n, Lp, e] in each round's order, order and chunk_of [b, h, n, Lp]
        (original position of each sorted slot; chunk of each original position). Returns the
        outputs [b, h, n, Lp, d] and log-sum-exps [b, h, n, Lp], in sorted order."""
        b, h, n, Lp, d = sq.shape
        c = self.bucket_size
        n_chunks = Lp // c
        device = sq.device

        def chunked(x: torch.Tensor) -> torch.Tensor:  # [b, h, n, Lp, e] -> [b, h, n, chunks, c, e]
            return x.view(b, h, n, n_chunks, c, -1)

        def with_previous(x: torch.Tensor) -> torch.Tensor:  # keys of the chunk before, then its own
            return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :, :n_chunks], x], dim=-2)

        sq, sk, sv = chunked(sq), with_previous(chunked(sk)), with_previous(chunked(sv))
        q_pos = order.view(b, h, n, n_chunks, c)
        k_pos = with_previous(q_pos.unsqueeze(-1)).squeeze(-1)
        k_exists = ((torch.arange(2 * c, device=device) >= c)
                    | (torch.arange(n_chunks, device=device) > 0).view(-1, 1)).unsqueeze(1)  # [chunks, 1, 2c]

        dtype = torch.float32 if sq.dtype in (torch.float16, torch.bfloat16) else sq.dtype
        scores = torch.matmul(sq, sk.transpose(-1, -2)).to(dtype) * self.scale  # [b, h, n, chunks, c, 2c]
        distance = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
        if self.alibi:
            slopes = self.alibi_slopes(device, dtype).view(1, h, 1, 1, 1, 1)
            scores = scores - slopes * distance.to(dtype)
        if n > 1:  # a pair visible in N rounds counts 1/N in each: the union's softmax
            times = torch.zeros_like(scores)
            for r in range(n):  # rounds r in which each pair of this window is visible too
                chunk_r = chunk_of[:, :, r]
                q_chunk = chunk_r.gather(-1, q_pos.flatten(2)).view(b, h, n, n_chunks, c, 1)
                k_chunk = chunk_r.gather(-1, k_pos.flatten(2)).view(b, h, n, n_chunks, 1, 2 * c)
                gap = q_chunk - k_chunk
                times += ((gap == 0) | (gap == 1)).to(dtype)
            scores = scores - torch.log(times.clamp(min=1))
        visible = (distance >= 0) & k_exists
        if segment_ids is not None:  # [b, Lp], padding -1: pairs of one document only
            doc = segment_ids.view(b, 1, 1, Lp).expand(b, h, n, Lp)
            doc_q = doc.gather(-1, q_pos.flatten(3)).view(q_pos.shape)
            doc_k = doc.gather(-1, k_pos.flatten(3)).view(k_pos.shape)
            visible = visible & same_document(doc_q, doc_k)
        scores = scores.masked_fill(distance == 0, SELF_SCORE).masked_fill(~visible, float("-inf"))

        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse).to(sv.dtype)
        if self.active_dropout > 0:
            probs = F.dropout(probs, self.active_dropout)
        out = torch.matmul(probs, sv)  # [b, h, n, chunks, c, d]
        return out.view(b, h, n, Lp, d), lse.view(b, h, n, Lp)


@kernels.eager
def chunk_kernel(sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor, order: torch.Tensor,
                 chunk_of: torch.Tensor, bucket_size: int, scale: float,
                 slopes: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`LshAttention.chunk_attention` on the LSH chunk kernel (megalong/kernels/lsh_attention.py)."""
    from megalong.kernels.lsh_attention import lsh_chunk_attention

    return lsh_chunk_attention(sq, sk, sv, order, chunk_of, bucket_size, scale, slopes, segment_ids)


class LshSelfAttention(SelfAttention):
    """megatron's SelfAttention with shared QK: `linear_qkv` projects queries and values only.

    Its output is laid out per head as [q_h; v_h] (so a column-parallel split keeps whole heads), and
    the key handed to the core attention is the query itself; `LshAttention` normalises it.
    """

    def __init__(self, config: Any, submodules: Any, layer_number: int, attn_mask_type: Any = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None):
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError("lsh attention shares queries and keys: grouped-query attention "
                             "(num_query_groups) is not supported")
        Attention.__init__(self, config=config, submodules=submodules, layer_number=layer_number,
                           attn_mask_type=attn_mask_type, attention_type="self",
                           cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.linear_qkv_out_dim = 2 * self.query_projection_size
        self.linear_qkv = submodules.linear_qkv(
            self.config.hidden_size, self.linear_qkv_out_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False,
            bias=self.config.add_bias_linear or self.config.add_qkv_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)
        self.q_layernorm = None
        self.k_layernorm = None

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: Any = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        if output_gate or not split_qkv:
            raise ValueError("lsh attention: output gates and fused qkv rope are not supported")
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        query, value = mixed.view(s, b, self.num_attention_heads_per_partition, 2,
                                  self.hidden_size_per_attention_head).unbind(dim=3)
        return query, query, value
