"""The vision encoder: pixel values -> row-stacked prompt table + M-RoPE inputs.

The tower itself is transformers' `Qwen3VLMoeVisionModel` with the checkpoint's
`model.visual.*` weights; this module batches the images of many requests into one forward
(the tower attends within each image only), splits the result per request, and packs each
request's table and rotary inputs (docs/design.md §3).

Two changes to how the tower runs, not to what it computes: its patch embedding (a Conv3d whose
kernel equals its stride) runs as the matmul it is, and the per-image position inputs that the
tower derives from `grid_thw` on every call are computed once per image size and handed in
(transformers takes them as precomputed keyword arguments).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import torch

from qwen3vl_triton.contract import image_row_ids
from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import ModelSpec, load_state, torch_dtype
from qwen3vl_triton.model.lm import warn_if_slow_bf16
from qwen3vl_triton.model.table import pack_table


@dataclass
class EncodeRequest:
    input_ids: np.ndarray  # (L,) with prompt-table ids for the image tokens
    pixel_values: np.ndarray  # (patches, patch_dim)
    image_grid_thw: np.ndarray  # (images, 3)
    positions: tuple[np.ndarray, int] | None = None  # M-RoPE position ids [3, L] and delta, once validated


@dataclass
class EncodeResult:
    prompt_embedding_table: torch.Tensor  # ((levels + 1) S, H)
    prompt_vocab_size: int  # rows of the table
    mrope_rotary_cos_sin: np.ndarray  # (P * rotary_dim,) float32
    mrope_position_deltas: int
    prompt_table_extra_ids: np.ndarray  # (L,) uint64: 0 for text, image tokens' contract.image_row_ids


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0


class ImageCache:
    """The rows of recent images -- merged embeddings `[n, H]` and DeepStack levels `[levels, n, H]`
    -- by a hash of what the tower reads for the image (its patch grid and pixel values, i.e. the
    image content with the preprocessing applied), bounded in bytes, least recently used dropped
    first. Rows of one image do not depend on the other images of a batch or on the prompt (the
    tower attends within each image; M-RoPE positions are computed per request, outside), so a
    hit returns exactly the rows a miss computed."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._rows: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(pixel_values: np.ndarray, grid: np.ndarray) -> bytes:
        h = hashlib.sha256(np.ascontiguousarray(grid, dtype=np.int64).tobytes())
        h.update(str(pixel_values.dtype).encode())
        h.update(np.ascontiguousarray(pixel_values).data)
        return h.digest()

    def get(self, key: bytes):
        with self._lock:
            rows = self._rows.get(key)
            if rows is None:
                self.stats.misses += 1
                return None
            self._rows.move_to_end(key)
            self.stats.hits += 1
            return rows

    def put(self, key: bytes, embeds: torch.Tensor, deepstack: torch.Tensor) -> None:
        size = embeds.nbytes + deepstack.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._rows:
                return
            self._rows[key] = (embeds.clone(), deepstack.clone())  # not views of a batch's output
            self.stats.bytes += size
            while self.stats.bytes > self.max_bytes:
                _, (e, d) = self._rows.popitem(last=False)
                self.stats.bytes -= e.nbytes + d.nbytes


class VisionEncoder:
    def __init__(self, spec: ModelSpec, device: str = "cpu", dtype: str = "float32",
                 mrope_positions: int | None = None, table_stride: int | None = None, cache_bytes: int = 0):
        """`mrope_positions`: rows of `mrope_rotary_cos_sin` (None: the prompt length, as the CPU
        engine wants; a TensorRT-LLM engine wants its max_position_embeddings).
        `table_stride`: S of every table (None: the request's own image-token count, as the CPU
        engine allows; a TensorRT-LLM engine addresses every request's table with one S).
        `cache_bytes`: bound of the cache of recent images' rows (0: no cache)."""
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

        self.spec = spec
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        if self.device.type == "cpu":
            warn_if_slow_bf16(self.dtype, "the vision encoder")
        self.mrope_positions = mrope_positions
        self.table_stride = table_stride
        self.model = Qwen3VLMoeVisionModel._from_config(spec.config.vision_config, dtype=self.dtype)
        state = load_state(spec.path, "model.visual.")
        self.model.load_state_dict(state, strict=True)
        self.model.patch_embed.proj = PatchLinear(self.model.patch_embed.proj)
        self.model.to(self.device).eval()
        self._lock = threading.Lock()
        self.cache = ImageCache(cache_bytes) if cache_bytes else None
        # a server sees a few image sizes over and over; 64 sizes of 448x448 take ~3 MB
        self._grid = functools.lru_cache(maxsize=64)(self._grid_inputs)

    def _grid_inputs(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tower's position inputs for one image of grid (t, h, w), as its forward derives them."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        m, grid = self.model, torch.tensor([[t, h, w]], dtype=torch.int64)
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=m.num_grid_per_side, mode=m.interpolation_mode,
            align_corners=m.interpolation_align_corners, spatial_merge_size=m.config.spatial_merge_size)
        positions = get_vision_position_ids(grid, m.spatial_merge_size)
        return indices.to(self.device), weights.to(self.device), positions.to(self.device)

    def _position_kwargs(self, grid_thw: np.ndarray, grid: torch.Tensor) -> dict:
        """The tower's position keyword arguments for a batch: `grid_thw` and `grid` (its tensor
        on the device) hold the same grids."""
        from transformers.vision_utils import get_vision_cu_seqlens

        parts = [self._grid(*g) for g in grid_thw.tolist()]
        return {"interp_indices": torch.cat([p[0] for p in parts]), "interp_weights": torch.cat([p[1] for p in parts]),
                "position_ids": torch.cat([p[2] for p in parts]), "cu_seqlens": get_vision_cu_seqlens(grid)}

    @torch.inference_mode()
    def features(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """E `[n, H]` and the stacked DeepStack levels `[levels, n, H]` of a set of images."""
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
        grid_thw = np.ascontiguousarray(grid_thw, dtype=np.int64)
        grid = torch.from_numpy(grid_thw).to(self.device)
        with self._lock:
            out = self.model(pv, grid_thw=grid, return_dict=True, **self._position_kwargs(grid_thw, grid))
        return out.pooler_output, torch.stack(list(out.deepstack_features))

    def image_rows(self, requests: list[EncodeRequest]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[bytes]]:
        """(E `[n, H]`, DeepStack `[levels, n, H]`) of every image of `requests`, in order, and each
        image's content hash (`ImageCache.key`): cached images from the cache, the others in one
        forward (then cached)."""
        merge = self.spec.spatial_merge_size ** 2
        images = []  # (pixel rows, grid) of each image
        for r in requests:
            start = 0
            for g in np.asarray(r.image_grid_thw, dtype=np.int64).reshape(-1, 3):
                n = int(np.prod(g))
                images.append((r.pixel_values[start:start + n], g))
                start += n
        rows: list = [None] * len(images)
        keys = [ImageCache.key(p, g) for p, g in images]
        missing = []
        for i, key in enumerate(keys):
            rows[i] = self.cache.get(key) if self.cache is not None else None
            if rows[i] is None:
                missing.append(i)
        if missing:
            embeds, deepstack = self.features(np.concatenate([images[i][0] for i in missing]),
                                              np.stack([images[i][1] for i in missing]))
            at = 0
            for i in missing:
                n = int(np.prod(images[i][1])) // merge
                rows[i] = (embeds[at:at + n], deepstack[:, at:at + n])
                at += n
                if self.cache is not None:
                    self.cache.put(keys[i], *rows[i])
        return rows, keys

    def encode(self, requests: list[EncodeRequest]) -> list[EncodeResult]:
        """Encode the images of all `requests` in one forward and pack each request's outputs."""
        rows, keys = self.image_rows(requests)
        results, at = [], 0
        for r in requests:
            mine = rows[at:at + len(r.image_grid_thw)]
            ids = np.asarray(r.input_ids).reshape(-1)
            extra = np.zeros(ids.size, np.uint64)
            if mine:  # table row j of the request -> its image's id of that row
                row_ids = np.concatenate([image_row_ids(key, e.shape[0])
                                          for key, (e, _) in zip(keys[at:at + len(mine)], mine)])
                fake = ids >= self.spec.vocab_size
                extra[fake] = row_ids[ids[fake] - self.spec.vocab_size]
            at += len(r.image_grid_thw)
            if mine:
                table = pack_table(torch.cat([e for e, _ in mine]), torch.cat([d for _, d in mine], dim=1),
                                   self.table_stride)
            else:
                zeros = torch.zeros((0, self.spec.hidden_size), dtype=self.dtype, device=self.device)
                table = pack_table(zeros, [zeros] * self.spec.deepstack_levels, self.table_stride)
            pos, delta = r.positions or mrope.position_ids(r.input_ids, r.image_grid_thw, self.spec)
            results.append(EncodeResult(
                prompt_embedding_table=table,
                prompt_vocab_size=table.shape[0],
                mrope_rotary_cos_sin=mrope.rotary_cos_sin(pos, self.spec, self.mrope_positions),
                mrope_position_deltas=delta,
                prompt_table_extra_ids=extra,
            ))
        return results

    def encode_each(self, requests: list[EncodeRequest]) -> list[EncodeResult | Exception]:
        """`encode` for a batch of independent requests: when the batch fails, each request is
        encoded alone, so an error reaches only the request that caused it."""
        try:
            return self.encode(requests)
        except Exception:  # noqa: BLE001 -- retried one by one below to find the culprit
            if len(requests) == 1:
                raise
        out: list[EncodeResult | Exception] = []
        for r in requests:
            try:
                out.extend(self.encode([r]))
            except Exception as exc:  # noqa: BLE001 -- this request's own failure
                out.append(exc)
        return out


class PatchLinear(torch.nn.Module):
    """The patch embedding's Conv3d (kernel == stride: one output per patch) as one matmul over
    the flattened patches: the same weights and sums, 3x faster on CPU than the convolution
    (a 448x448 image: 10 ms -> 3 ms on the 2-core benchmark machine). vLLM runs it the same way."""

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = conv.bias

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (n, C, T, P, P) -> (n, out)
        return torch.nn.functional.linear(patches.reshape(patches.shape[0], -1), self.weight, self.bias)


def block_bounds(spec: ModelSpec, max_images: int | None, max_videos: int = 0) -> tuple[int | None, int, int]:
    """(most blocks, least and most pixels of a block) that preprocessing sends: a block is an image
    or one frame group of a video (grid (1, h, w) either way). A video's frames keep at most
    `video_max_pixels` together, in groups of `temporal_patch_size` (so each group at most that
    share), and smart_resize keeps a frame at least one merged patch wide and high."""
    blocks, low, high = max_images, spec.min_pixels, spec.max_pixels
    if max_videos and spec.video_max_pixels:
        groups = -(-int(spec.video_max_frames) // spec.temporal_patch_size)
        blocks = None if blocks is None else blocks + max_videos * groups
        low = min(low, spec.merge_factor ** 2)
        high = max(high, spec.video_max_pixels // spec.temporal_patch_size)
    return blocks, low, high


def encode_request_from_arrays(arrays: dict, spec: ModelSpec, table_stride: int | None = None,
                               max_images: int | None = None, max_input_len: int | None = None,
                               max_videos: int = 0) -> EncodeRequest:
    """Validate one request's `vision_encoder` inputs (batch dimension removed): anything the
    ensemble's preprocessing would never send is refused here, so a direct call cannot make the
    tower do more work than the checkpoint allows or fail inside a batch. `image_grid_thw` holds a
    grid per block of the table: each image, and each frame group of each video."""
    from qwen3vl_triton.contract import Bounds, check_input_ids
    from qwen3vl_triton.errors import InputError

    # the token ids as the LLM checks them (a prompt of at most max_input_len tokens)
    ids = check_input_ids(Bounds.of(spec, max_seq_len=None if max_input_len is None else max_input_len + 1),
                          arrays["input_ids"])
    pixels = np.asarray(arrays["pixel_values"], dtype=np.float32)
    grid = np.asarray(arrays["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
    patch_dim = 3 * spec.temporal_patch_size * spec.patch_size ** 2
    max_blocks, low, high = block_bounds(spec, max_images, max_videos)
    if max_blocks is not None and len(grid) > max_blocks:
        raise InputError("image_grid_thw", f"{len(grid)} images and video frame groups, at most {max_blocks} are "
                                           "allowed")
    if pixels.ndim != 2 or pixels.shape[1] != patch_dim:
        raise InputError("pixel_values", f"must be [patches, {patch_dim}], got {list(pixels.shape)}")
    if (grid < 1).any() or (grid[:, 1:] % spec.spatial_merge_size).any():
        raise InputError("image_grid_thw", f"grids must be positive and multiples of {spec.spatial_merge_size}")
    for k, (t, h, w) in enumerate(grid.tolist()):
        pixels_of_image = h * w * spec.patch_size ** 2
        if t != 1:
            raise InputError("image_grid_thw", f"image {k} has {t} temporal patches; images have 1")
        if not low <= pixels_of_image <= high:
            raise InputError("image_grid_thw", f"image {k} is {h}x{w} patches = {pixels_of_image} pixels, outside "
                                               f"the checkpoint's [{low}, {high}]")
    patches = int(grid.prod(axis=1).sum())
    if patches != pixels.shape[0]:
        raise InputError("pixel_values", f"has {pixels.shape[0]} patches, image_grid_thw describes {patches}")
    if not np.isfinite(pixels).all():
        raise InputError("pixel_values", "holds NaN or infinite values")
    tokens = patches // spec.spatial_merge_size ** 2
    if table_stride and tokens > table_stride:
        raise InputError("image", f"the images make {tokens} image tokens; the engine's prompt table holds "
                                  f"{table_stride} per request (fewer or smaller images)")
    fake = ids >= spec.vocab_size
    if int(fake.sum()) != tokens or (tokens and sorted(ids[fake] - spec.vocab_size) != list(range(tokens))):
        raise InputError("input_ids", f"must hold the {tokens} image-token ids vocab_size + 0..{tokens - 1} once each")
    try:  # each image's ids in order, one block per image, as the M-RoPE positions need them
        positions = mrope.position_ids(ids, grid, spec)
    except ValueError as exc:
        raise InputError("input_ids", f"image-token ids out of order: {exc}") from None
    return EncodeRequest(ids, pixels, grid, positions)
