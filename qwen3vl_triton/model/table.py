"""The row-stacked prompt table that carries the image embeddings and DeepStack levels.

For a request with `n` image tokens and stride `S >= n` the table is `[4S, H]` (with three
DeepStack levels; `[(levels + 1) S, H]` in general):

    rows [0, S)                 E   -- merged image embeddings; fake id `vocab + j` -> row j
    rows [(k+1) S, (k+1) S + n) D_k -- added after decoder layer k at the same token

`prompt_vocab_size` is the total row count `(levels + 1) S`. This module is the single
definition of that layout: the vision encoder packs with it, the CPU engine and the
TensorRT-LLM plugin's reference read with `deepstack_row`.
"""

from __future__ import annotations

import numpy as np
import torch


def stride_of(rows: int, levels: int) -> int:
    """Table stride S from the total row count `(levels + 1) S`."""
    if rows % (levels + 1):
        raise ValueError(f"a prompt table of {rows} rows is not {levels + 1} stacked blocks")
    return rows // (levels + 1)


def pack_table(
    embeds: torch.Tensor, deepstack: list[torch.Tensor] | torch.Tensor, stride: int | None = None
) -> torch.Tensor:
    """Stack E `[n, H]` and D_k `[n, H]` into `[(levels+1) S, H]`; S = max(stride or n, 1)."""
    n, hidden = embeds.shape
    levels = len(deepstack)
    s = max(stride if stride is not None else n, 1)
    if s < n:
        raise ValueError(f"stride {s} is smaller than the {n} image tokens")
    table = embeds.new_zeros(((levels + 1) * s, hidden))
    table[:n] = embeds
    for k, level in enumerate(deepstack):
        if level.shape != embeds.shape:
            raise ValueError(f"DeepStack level {k} has shape {tuple(level.shape)}, embeddings {tuple(embeds.shape)}")
        table[(k + 1) * s:(k + 1) * s + n] = level
    return table


def deepstack_row(ids: np.ndarray | torch.Tensor, vocab_size: int, stride: int, level: int):
    """Table row added after decoder layer `level` for each token id, or -1 (text: add nothing).

    The one statement of the DeepStack indexing: fake id `vocab + j` (0 <= j < S) reads row
    `(level + 1) * S + j`.
    """
    j = ids - vocab_size
    inside = (j >= 0) & (j < stride)
    row = (level + 1) * stride + j
    if isinstance(ids, torch.Tensor):
        return torch.where(inside, row, torch.full_like(row, -1))
    return np.where(inside, row, -1)


def deepstack_add_reference(hidden: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, vocab_size: int,
                            stride: int, level: int) -> torch.Tensor:
    """hidden `[T, H]` + the DeepStack level for one request's tokens (out of place)."""
    row = deepstack_row(ids, vocab_size, stride, level)
    mask = row >= 0
    out = hidden.clone()
    out[mask] += table[row[mask]].to(hidden.dtype)
    return out
