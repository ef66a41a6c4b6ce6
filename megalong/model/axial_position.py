"""Axial position embeddings (Ho et al. 2019; Reformer): position p of a [rows, cols] grid is
(p // cols, p % cols), embedded as a row vector plus a column vector (`sum`) or the two side by
side (`concat`, hidden_size // 2 and the rest), with rows + cols vectors instead of rows x cols.

`model.position_embedding: axial` builds megatron's GPTModel with no position embedding and puts
this module in the embedding's `position_embeddings` slot, where megatron adds it to the word
embeddings before the embedding dropout (`attach_axial_position_embedding`).
"""
from __future__ import annotations

import torch
from torch import nn


class AxialPositionEmbedding(nn.Module):
    def __init__(self, shape: list[int], hidden_size: int, mode: str = "sum", init_std: float = 0.02):
        super().__init__()
        if mode not in ("sum", "concat"):
            raise ValueError(f"axial position embedding: unknown mode '{mode}'")
        self.rows, self.cols = shape
        self.mode = mode
        row_dim = hidden_size if mode == "sum" else hidden_size // 2
        col_dim = hidden_size if mode == "sum" else hidden_size - row_dim
        self.row_embeddings = nn.Parameter(torch.empty(self.rows, row_dim))
        self.col_embeddings = nn.Parameter(torch.empty(self.cols, col_dim))
        nn.init.normal_(self.row_embeddings, std=init_std)
        nn.init.normal_(self.col_embeddings, std=init_std)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (any shape, values < rows x cols) -> [*position_ids.shape, hidden_size]."""
        if position_ids.shape[-1] > self.rows * self.cols:
            raise ValueError(f"axial position embedding: {position_ids.shape[-1]} positions do not fit "
                             f"the {self.rows} x {self.cols} grid (model.axial_position.shape)")
        row = self.row_embeddings[position_ids // self.cols]
        col = self.col_embeddings[position_ids % self.cols]
        return row + col if self.mode == "sum" else torch.cat([row, col], dim=-1)


def attach_axial_position_embedding(embedding: nn.Module, shape: list[int], mode: str,
                                    init_std: float) -> None:
    """Give megatron's LanguageModelEmbedding (built with position_embedding_type 'none') axial
    position embeddings, added to the word embeddings in its forward."""
    if getattr(embedding, "reduce_scatter_embeddings", False):
        raise ValueError("axial position embeddings do not support sequence-parallel embeddings")
    embedding.position_embeddings = AxialPositionEmbedding(shape, embedding.config.hidden_size, mode, init_std)
    embedding.add_position_embedding = True
