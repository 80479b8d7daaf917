"""The DeepStack add as the TensorRT-LLM engine computes it for a whole batch.

In an in-flight batch TensorRT-LLM's runtime (`PromptTuningBuffers::fill`) copies the prompt
table of the request in batch slot b to rows [b * P, b * P + rows) of one big table, where
P = max_prompt_embedding_table_size / max_batch_size is the engine's `prompt_vocab_size` input,
and gives every token its slot in `tasks`. `PromptTuningEmbedding` then reads fake id
`vocab + j` from row `tasks * P + j`. The DeepStack add after layer k reads, for the same token,

    tasks * P + deepstack_row(id, vocab, S, k)      (S = P / (levels + 1); no row: add nothing)

so every request's table must be packed with the engine's stride S = P / (levels + 1) -- the
stride is an engine constant on the GPU (`table.pack_table(..., stride=S)`).

Two implementations, switchable at build time: the `DeepstackAdd` TensorRT plugin
(builders/plugin, same index arithmetic in C++), and `deepstack_add_graph`, made of stock
elementwise/gather ops. The graph takes an op namespace `F` -- `tensorrt_llm.functional` in the
engine, `TORCH_OPS` in the tests -- so the graph itself is tested on the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from qwen3vl_triton.model.table import deepstack_row

# The plugin's identity; builders/plugin/src/deepstack_plugin.cpp registers the same.
PLUGIN_NAME = "DeepstackAdd"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "qwen3vl"
PLUGIN_FIELDS = ("vocab_size", "levels", "level")
PLUGIN_LIBRARY = "libqwen3vl_deepstack_plugin.so"  # what builders/plugin/CMakeLists.txt produces

IMPLEMENTATIONS = ("plugin", "stock")


def local_rows(prompt_vocab_size: int, levels: int, level: int) -> np.ndarray:
    """int32 `[P]`: the row inside one request's table that prompt-table id `vocab + j` adds after
    layer `level`, or -1. The stock graph looks fake ids up here instead of re-deriving the rows."""
    if prompt_vocab_size % (levels + 1):
        raise ValueError(f"prompt_vocab_size {prompt_vocab_size} is not {levels + 1} stacked blocks")
    stride = prompt_vocab_size // (levels + 1)
    return deepstack_row(np.arange(prompt_vocab_size), 0, stride, level).astype(np.int32)


def deepstack_add_graph(F, hidden, ids, table, tasks, prompt_vocab_size, rows, vocab_size: int):
    """hidden `[T, H]` plus one DeepStack level, from stock ops.

    ids, tasks: `[T]` int32; table: `[slots * P, H]`; prompt_vocab_size: `[1]` int32 (P);
    rows: `local_rows(P, levels, level)` as a tensor. `F` provides where, index_select, unsqueeze.
    """
    last = int(rows.shape[0]) - 1
    j = ids - vocab_size
    j = F.where(j < 0, 0, F.where(j > last, last, j))  # a valid index into `rows` for every token
    local = F.index_select(rows, 0, j)
    local = F.where(ids < vocab_size, -1, local)  # text tokens: nothing
    row = tasks * prompt_vocab_size + F.where(local < 0, 0, local)
    added = hidden + F.index_select(table, 0, row)
    return F.where(F.unsqueeze(local > -1, -1), added, hidden)


TORCH_OPS = SimpleNamespace(where=torch.where, index_select=torch.index_select, unsqueeze=torch.unsqueeze)


def batch_tables(tables: list[torch.Tensor | None], prompt_vocab_size: int) -> torch.Tensor:
    """The runtime's batched table: request b's table at rows [b * P, ...), zeros elsewhere
    (what PromptTuningBuffers::fill builds). For tests and the reference; the engine gets it
    from TensorRT-LLM."""
    hidden = next(t.shape[1] for t in tables if t is not None)
    dtype = next(t.dtype for t in tables if t is not None)
    out = torch.zeros((len(tables) * prompt_vocab_size, hidden), dtype=dtype)
    for b, t in enumerate(tables):
        if t is not None:
            if t.shape[0] > prompt_vocab_size:
                raise ValueError(f"table of request {b} has {t.shape[0]} rows, the engine's slots {prompt_vocab_size}")
            out[b * prompt_vocab_size:b * prompt_vocab_size + t.shape[0]] = t
    return out
