"""`axial`: attention along rows and columns of the sequence folded to [rows, cols], causal,
O(L * (rows + cols)) (Ho et al. 2019, "Axial Attention in Multidimensional Transformers"; ColTran).

Token p sits at (r, c) = (p // cols, p % cols). One layer computes, for every token:

1. Row summaries (Ho et al.'s unmasked row attention of the outer context): u(r, c) = the
   attention of q(r, c) over the whole row r (keys k(r, .), values v(r, .)). u(r, c) sees later
   tokens of row r, so it is only ever used by tokens of later rows.
2. One softmax over two key sets, so that every earlier token reaches (r, c):
   - the row step: the tokens (r, c') of its own row with c' <= c (keys k, values v);
   - the column step: its column in the previous rows, (r', c) with r' < r, with keys k(r', c) and
     values u(r', c), which carry the whole of row r'.
   Rows before r reach (r, c) through the column step, its own row up to itself through the row
   step; no output depends on a later token.

ALiBi biases each score by the true token distance: c - c' in the row step, (r - r') * cols in the
column step, |c - c'| in the (bidirectional) row summaries. The sequence need not fill the shape:
it is padded to whole rows of `cols` tokens (later positions, which no real token sees) and may be
longer than rows x cols (more rows), so generation with a growing context works.

Packed documents (`attend_documents`): the row summaries, the row step and the column step each
keep only keys of the query's own document (a summary u(r', c) used by (r, c) is then over row
r''s tokens of that document); positions padded to whole rows belong to no document.

Context parallelism (`parallel.context`): whole rows per rank, the earlier rows' keys and summaries
all-gathered (context_axial.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megalong.attention import context_axial
from megalong.attention.base import CoreAttention
from megalong.attention.options import AxialOptions
from megalong.attention.segments import same_document

# (keys, row summaries, padded segment ids of this chunk's rows) -> those of every row, first row index
Columns = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                   tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]]


class AxialAttention(CoreAttention):
    options_class = AxialOptions
    options: AxialOptions
    grouped_kv = True
    grouped_context = True  # attend_context too: the context exchanges carry the groups

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        axial_shape = self.options.axial_shape
        if not axial_shape or len(axial_shape) != 2:
            raise ValueError(f"axial attention needs axial_shape [rows, cols], got {axial_shape!r}")
        self.rows, self.cols = axial_shape

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               segment_ids: Optional[torch.Tensor] = None, columns: Optional[Columns] = None) -> torch.Tensor:
        """q [b, heads, L, d], k and v [b, groups, L, d]. Scores are laid out [b, g, R, j, C, keys]
        (query head g * j' + j, j' = heads / groups): each matmul takes a group's query heads as
        rows against its keys, never a copy of k or v per query head. `columns`: under context
        parallelism (context_axial.py), maps this chunk's rows' keys [b, g, R, C, d], summaries
        [b, g, R, j, C, d] and padded segment ids [b, 1, R, C] (or None) to those of every row of
        the sequence and the index of this chunk's first row; None: the rows are the whole sequence."""
        b, h, L, d = q.shape
        g = k.shape[1]
        j = h // g
        C = self.cols
        R = -(-L // C)
        Q, K, V = (F.pad(x, (0, 0, 0, R * C - L)).view(b, x.shape[1], R, C, d) for x in (q, k, v))
        Q6 = Q.view(b, g, j, R, C, d)
        device = q.device
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

        col = torch.arange(C, device=device)
        row_gap = col.view(C, 1) - col  # c - c'
        Q_rows = Q6.permute(0, 1, 3, 2, 4, 5).reshape(b, g, R, j * C, d)  # a row's queries, all heads of the group
        row_scores = (torch.matmul(Q_rows, K.transpose(-1, -2)).to(dtype) * self.scale).view(b, g, R, j, C, C)
        if self.alibi:
            slopes = self.alibi_slopes(device, dtype).view(1, g, 1, j, 1, 1)
            row_scores = row_scores - slopes * row_gap.abs().to(dtype)

        seg = None
        if segment_ids is not None:  # padding: document -1, seen by no real token
            seg = F.pad(segment_ids, (0, R * C - L), value=-1).view(b, 1, R, C)
            row_scores = row_scores.masked_fill(~same_document(seg, seg).unsqueeze(3), float("-inf"))  # [b, 1, R, 1, C, C]

        # 1. Row summaries over whole rows: [b, g, R, j, C, d], one per query head.
        row_probs = self._dropout(torch.softmax(row_scores, dim=-1)).to(v.dtype)
        summary = torch.matmul(row_probs.reshape(b, g, R, j * C, C), V).view(b, g, R, j, C, d)
        K_cols, U_cols, seg_cols, first = (K, summary, seg, 0) if columns is None else columns(K, summary, seg)
        Rc = K_cols.shape[2]  # the rows a column's queries see (those of every rank under CP)
        col_same = None
        if seg is not None and seg_cols is not None:  # [b, 1, R, 1, C, R']
            col_same = same_document(seg.transpose(2, 3), seg_cols.transpose(2, 3)).transpose(2, 3).unsqueeze(3)

        # 2. Joint softmax over the row prefix and the column above.
        Q_cols = Q6.permute(0, 1, 4, 2, 3, 5).reshape(b, g, C, j * R, d)  # a column's queries
        col_scores = torch.matmul(Q_cols, K_cols.transpose(2, 3).transpose(-1, -2)).to(dtype) * self.scale
        col_scores = col_scores.view(b, g, C, j, R, Rc).permute(0, 1, 4, 3, 2, 5)  # [b, g, R, j, C, R']
        row = first + torch.arange(R, device=device)
        col_gap = (row.view(R, 1) - torch.arange(Rc, device=device)).view(R, 1, 1, Rc)  # r - r', against [R, j, C, R']
        if self.alibi:
            col_scores = col_scores - slopes * (col_gap * C).to(dtype)
        col_scores = col_scores.masked_fill(col_gap <= 0, float("-inf"))
        if col_same is not None:
            col_scores = col_scores.masked_fill(~col_same, float("-inf"))
        scores = torch.cat([row_scores.masked_fill(row_gap < 0, float("-inf")), col_scores], dim=-1)
        probs = self._dropout(torch.softmax(scores, dim=-1)).to(v.dtype)
        p_row, p_col = probs.split([C, Rc], dim=-1)
        out_row = torch.matmul(p_row.reshape(b, g, R, j * C, C), V).view(b, g, R, j, C, d)
        # the column step's values are the summaries of the same query head and column
        out_col = torch.matmul(p_col.permute(0, 1, 3, 4, 2, 5), U_cols.permute(0, 1, 3, 4, 2, 5))  # [b, g, j, C, R, d]
        out = out_row.permute(0, 1, 3, 2, 4, 5) + out_col.transpose(3, 4)  # [b, g, j, R, C, d]
        return out.reshape(b, h, R * C, d)[:, :, :L]

    attend_documents = attend  # one implementation serves packed documents too

    def attend_context(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segment_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's whole rows, the keys and row summaries of the earlier rows all-gathered
        (context_axial.py)."""
        return context_axial.axial_context(self, q, k, v, segment_ids)

    def _dropout(self, probs: torch.Tensor) -> torch.Tensor:
        return F.dropout(probs, self.active_dropout) if self.active_dropout > 0 else probs
