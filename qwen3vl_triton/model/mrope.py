"""Multimodal rotary positions (M-RoPE) of Qwen3-VL, in the form TensorRT-LLM consumes them.

Every prompt token gets three position ids (temporal, height, width). Text tokens advance all
three together; the tokens of one image take a grid of positions starting where the text left
off, and the text after the image resumes at `start + max(grid_h, grid_w)`. During decoding all
three rows equal `cache_len + delta`, where `delta = max(prompt positions) + 1 - prompt_len`.

TensorRT-LLM's engine takes the prompt's rotary table precomputed, as `mrope_rotary_cos_sin`:
`[P, rotary_dim / 2, 2]` (cos, sin) float32 flattened, P >= prompt length (the GPU engine wants
P = its max_position_embeddings; rows past the prompt are position 0), plus
`mrope_position_deltas` = delta. The CPU engine consumes exactly the same two inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qwen3vl_triton.model.checkpoint import ModelSpec


def position_ids(input_ids: np.ndarray, image_grid_thw: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, int]:
    """M-RoPE position ids `[3, L]` (int64) and the decode delta for one prompt.

    Image tokens are the prompt-table ids (`>= spec.vocab_size`); image `i` owns the
    `t*h*w / merge**2` consecutive table rows that follow the rows of images `0..i-1`.
    """
    ids = np.asarray(input_ids).reshape(-1)
    merge = spec.spatial_merge_size
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    tokens_per_image = [int(t * h * w) // (merge * merge) for t, h, w in grids]
    first_row = np.cumsum([0] + tokens_per_image)  # table row of each image's first token
    pos = np.zeros((3, ids.size), dtype=np.int64)
    cur = 0
    i = 0
    image = 0
    while i < ids.size:
        if ids[i] < spec.vocab_size:
            pos[:, i] = cur
            cur += 1
            i += 1
            continue
        if image >= len(grids) or ids[i] - spec.vocab_size != first_row[image]:
            raise ValueError(f"image token at position {i} does not start image {image}")
        t, h, w = (int(x) for x in grids[image])
        lh, lw = h // merge, w // merge
        n = tokens_per_image[image]
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        pos[0, i:i + n] = tt.reshape(-1) + cur
        pos[1, i:i + n] = hh.reshape(-1) + cur
        pos[2, i:i + n] = ww.reshape(-1) + cur
        cur += max(h, w) // merge
        i += n
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} images given but {image} found in the prompt")
    delta = int(pos.max()) + 1 - ids.size if ids.size else 0
    return pos, delta


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """`[rotary_dim / 2]` float32 inverse frequencies (the default RoPE of the text model)."""
    dim = spec.rotary_dim
    return 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _compose(freqs: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Pick, for each rotary frequency, which of the three position rows drives it.

    freqs: `[3, P, rotary_dim / 2]` -> `[P, rotary_dim / 2]`. Qwen3-VL interleaves (T H W T H W ...,
    the tail all T); Qwen2-VL used contiguous sections.
    """
    sec = spec.mrope_section
    if spec.mrope_interleaved:
        out = freqs[0].clone()
        for row in (1, 2):
            idx = slice(row, sec[row] * 3, 3)
            out[..., idx] = freqs[row, ..., idx]
        return out
    parts = freqs.split(list(sec), dim=-1)
    return torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)


def angles(pos: np.ndarray | torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Rotary angles `[P, rotary_dim / 2]` for M-RoPE positions `[3, P]`."""
    pos = torch.as_tensor(pos, dtype=torch.int64)
    freqs = pos[..., None].float() * inv_freq(spec)  # (3, P, dim/2)
    return _compose(freqs, spec)


def rotary_cos_sin(pos: np.ndarray, spec: ModelSpec, num_positions: int | None = None) -> np.ndarray:
    """`mrope_rotary_cos_sin` for one prompt: float32 `[P * rotary_dim]`, layout `[P, dim/2, (cos, sin)]`.

    P = `num_positions` (rows past the prompt hold position 0, as TensorRT-LLM pads) or the
    prompt length.
    """
    length = pos.shape[1]
    rows = length if num_positions is None else num_positions
    if rows < length:
        raise ValueError(f"num_positions {rows} is shorter than the prompt ({length} tokens)")
    padded = np.zeros((3, rows), dtype=np.int64)
    padded[:, :length] = pos
    ang = angles(padded, spec)
    return torch.stack((ang.cos(), ang.sin()), dim=-1).reshape(-1).numpy()


def unpack_cos_sin(flat: np.ndarray | torch.Tensor, spec: ModelSpec, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `rotary_cos_sin` for the first `length` positions: cos, sin `[length, dim/2]`."""
    half = spec.rotary_dim // 2
    table = torch.as_tensor(flat, dtype=torch.float32).reshape(-1, half, 2)
    if table.shape[0] < length:
        raise ValueError(f"holds {table.shape[0]} positions, the prompt has {length}")
    return table[:length, :, 0], table[:length, :, 1]


def text_cos_sin(positions: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[n, dim/2]` for decode positions (all three M-RoPE rows equal)."""
    ang = positions.to(torch.int64)[:, None].float() * inv_freq(spec)
    return ang.cos(), ang.sin()


# -- integer positions from a rotary table ------------------------------------------------------------

def position_rows(spec: ModelSpec) -> np.ndarray:
    """`[rotary_dim / 2]`: which M-RoPE row (0 t, 1 h, 2 w) drives each rotary frequency (mrope._compose)."""
    half = spec.rotary_dim // 2
    rows = np.zeros(half, dtype=np.int64)
    sec = spec.mrope_section
    if spec.mrope_interleaved:
        for row in (1, 2):
            rows[row:sec[row] * 3:3] = row
    else:
        start = 0
        for i, n in enumerate(sec):
            rows[start:start + n] = i % 3
            start += n
    return rows


def recoverable(spec: ModelSpec) -> bool:
    """Every row's lowest frequency turns by less than pi over the model's positions."""
    inv = inv_freq(spec).double().numpy()
    rows = position_rows(spec)
    return all(inv[rows == r].min() * spec.max_position_embeddings < math.pi for r in range(3) if (rows == r).any())


def positions_from_cos_sin(cos: torch.Tensor, sin: torch.Tensor, spec: ModelSpec,
                           tolerance: float = 0.05) -> np.ndarray:
    """M-RoPE position ids `[3, L]` (int64) whose rotary table is `cos`, `sin` `[L, rotary_dim / 2]`.

    For each row, the angle of its lowest frequency is the position times that frequency without
    wrap-around (`recoverable`); each higher frequency of the row then refines the estimate
    (the number of whole turns from the estimate, the position from the measured angle). The
    result is checked by recomputing the table; ValueError when it does not match."""
    angle = np.arctan2(sin.double().numpy(), cos.double().numpy())  # (L, d/2) in (-pi, pi]
    inv = inv_freq(spec).double().numpy()
    rows = position_rows(spec)
    pos = np.zeros((3, angle.shape[0]), dtype=np.int64)
    for r in range(3):
        idx = np.flatnonzero(rows == r)
        if idx.size == 0:
            continue
        idx = idx[np.argsort(inv[idx])]  # lowest frequency first
        est = angle[:, idx[0]] / inv[idx[0]]
        for j in idx[1:]:
            turns = np.rint((est * inv[j] - angle[:, j]) / (2 * math.pi))
            est = (angle[:, j] + 2 * math.pi * turns) / inv[j]
        pos[r] = np.rint(est).astype(np.int64)
    ang = angles(pos, spec)
    err = max((float((ang.cos() - cos).abs().max()), float((ang.sin() - sin).abs().max()))) if pos.size else 0.0
    if not err <= tolerance:
        raise ValueError(f"mrope_rotary_cos_sin is not the M-RoPE table of integer positions (off by {err:.3g})")
    return pos


def continue_cos_sin(flat: np.ndarray | None, spec: ModelSpec, length: int, delta: int,
                     count: int) -> np.ndarray | None:
    """`mrope_rotary_cos_sin` of a prompt of `length` tokens followed by `count` text tokens (tokens
    a generation already produced, now part of the prompt): those take the decode positions
    `index + delta` on all three rows, as they had when they were generated. None stays None (text
    positions are then the indices themselves)."""
    if flat is None or count == 0:
        return flat
    half = spec.rotary_dim // 2
    head = np.asarray(flat, np.float32).reshape(-1)[:length * 2 * half]
    cos, sin = text_cos_sin(torch.arange(length, length + count) + int(delta), spec)
    return np.concatenate([head, torch.stack((cos, sin), dim=-1).reshape(-1).numpy()])
