"""Request preprocessing: chat template, tokenization, image and video decode, resize/patchify, placeholders.

The checkpoint's own tokenizer, chat template, image processor (transformers' Qwen2-VL image
processor configured by `preprocessor_config.json`) and video processor (`text/video.py`) do the
work; this module validates inputs and replaces each image's and each video frame group's
placeholder tokens by the prompt-table ids the LLM reads.

A request is either `text_input` + `image` + `video` (one user message: the images, the videos,
then the text) or `messages`, a JSON array of OpenAI chat messages (docs/design.md §4-5). Byte bounds on
the text, each image, each video and the whole request are checked first, before any JSON parsing,
templating or decoding.

The prompt table holds one block of rows per image and per frame group of a video (a video of
grid (T, h, w) is T blocks of grid (1, h, w): the vision tower attends within each frame group, and
transformers' `get_rope_index` positions each group as an image of its own), in prompt order.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from qwen3vl_triton.errors import InputError
from qwen3vl_triton.text import untrusted
from qwen3vl_triton.text.image_size import declared_size
from qwen3vl_triton.text.video import VideoLimits

if TYPE_CHECKING:  # not imported at run time: the OpenAI endpoint checks messages here without torch
    from qwen3vl_triton.model.checkpoint import ModelSpec

# Decoding a bigger image than this is refused before its pixels are decoded.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
ROLES = ("system", "user", "assistant")
_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]*$")


@dataclass(frozen=True)
class Limits:
    """Byte bounds checked before any work. `text_bytes`: all text of a request (the prompt, or every
    text part of the messages); `image_bytes`: each encoded image file (base64 counts 3/4 of its
    length); `request_bytes`: every input of the request together, as sent."""

    text_bytes: int = 64 * 2**10
    image_bytes: int = 20 * 2**20
    request_bytes: int = 64 * 2**20
    video: VideoLimits = field(default_factory=VideoLimits)  # each video: bytes, frames, seconds, pixels


def encoded_size(data: bytes | str) -> int:
    """Bytes of the image file that `data` (a file, base64 of one, or a data URL; bytes, or a str as
    JSON gives it) carries, from its length alone (nothing is copied)."""
    head = data[:256] if isinstance(data, bytes) else data[:256].encode("utf-8", "replace")
    if head[:5].lower() == b"data:":
        comma = data.find(b"," if isinstance(data, bytes) else ",")
        return (len(data) - comma - 1) * 3 // 4 if comma >= 0 else 0
    if _BASE64.match(head):
        return len(data) * 3 // 4
    return len(data)


# The optional request inputs of TensorRT-LLM's `ensemble` model (NVIDIA/TensorRT-LLM
# triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt), which tools written for it
# send as they are: genai-perf's TensorRT-LLM mode sends exclude_input_in_output, and min_length
# (its older name of min_tokens) for deterministic output lengths. Each is honoured where it asks
# for nothing this server does not do, and refused by name where it does (parse_options).
TRTLLM_OPTIONAL_INPUTS = (
    "exclude_input_in_output", "min_length", "min_tokens", "beam_width", "num_return_sequences",
    "return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics",
    "return_num_input_tokens", "return_num_output_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "length_penalty", "end_id", "pad_id", "bad_words", "embedding_bias_words",
    "embedding_bias_weights",
)
_NOT_RETURNED = ("return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics",
                 "return_num_input_tokens", "return_num_output_tokens")
# input -> the value that asks for nothing (TensorRT-LLM's default)
_NEUTRAL = {"beam_width": 1, "num_return_sequences": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "repetition_penalty": 1.0}
_WHY_NOT = {
    "beam_width": "beam search is not implemented here (one beam, sampled or greedy)",
    "num_return_sequences": "one sequence is returned per request",
    "presence_penalty": "penalties are not implemented here",
    "frequency_penalty": "penalties are not implemented here",
    "repetition_penalty": "penalties are not implemented here",
}


@dataclass(frozen=True)
class Options:
    """What the TensorRT-LLM ensemble's optional inputs of one request ask for, validated."""

    min_tokens: int = 0  # no end token before this many generated tokens (min_length / min_tokens)


def _flag(arrays: dict, name: str) -> bool | None:
    from qwen3vl_triton.arrays import scalar

    return scalar(arrays, name, bool)


def _words(arrays: dict, name: str) -> list:
    value = arrays.get(name)
    if value is None:
        return []
    return [w for w in value.reshape(-1) if (len(w) if isinstance(w, (bytes, str)) else True)]


def parse_options(arrays: dict, max_tokens: int, end_ids: Sequence[int] = (), min_tokens: bool = True) -> Options:
    """The TensorRT-LLM ensemble's optional inputs of one request (TRTLLM_OPTIONAL_INPUTS).

    Honoured: exclude_input_in_output true (outputs never hold the prompt here), beam_width and
    num_return_sequences 1, return_* false, the penalties at their neutral values, length_penalty
    (it scores beams only, and there is one), end_id when it is one of the checkpoint's end ids
    (`end_ids`: generation ends at all of them), pad_id (nothing is padded), empty bad_words and
    embedding_bias_*, and min_length / min_tokens (0 to max_tokens) where `min_tokens` is True.
    Anything else is refused with an InputError naming the input."""
    from qwen3vl_triton.arrays import scalar

    if _flag(arrays, "exclude_input_in_output") is False:
        raise InputError("exclude_input_in_output", "false is not supported: outputs here never include the "
                                                    "prompt; send true or leave it out")
    for name in _NOT_RETURNED:
        if _flag(arrays, name):
            raise InputError(name, "true is not supported: only text_output (and output_ids, prompt_tokens, "
                                   "finish_reason) are returned here; send false or leave it out")
    for name, neutral in _NEUTRAL.items():
        value = scalar(arrays, name, type(neutral))
        if value is not None and value != neutral:
            raise InputError(name, f"must be {neutral} ({_WHY_NOT[name]}), got {value}")
    length_penalty = scalar(arrays, "length_penalty", float)
    if length_penalty is not None and not np.isfinite(length_penalty):
        raise InputError("length_penalty", f"must be a finite number, got {length_penalty}")
    end_id = scalar(arrays, "end_id", int)
    if end_id is not None and not end_ids:
        raise InputError("end_id", "is not taken by this model (generation ends at the checkpoint's end ids); "
                                   "leave it out")
    if end_id is not None and end_id not in end_ids:
        raise InputError("end_id", f"must be one of the checkpoint's end ids {sorted(end_ids)} (generation ends at "
                                   f"each of them; another end id is not implemented), got {end_id}")
    scalar(arrays, "pad_id", int)  # one value; outputs are never padded
    for name in ("bad_words", "embedding_bias_words"):
        if _words(arrays, name):
            raise InputError(name, "is not implemented here; send an empty list or leave it out")
    weights = arrays.get("embedding_bias_weights")
    if weights is not None and weights.size:
        raise InputError("embedding_bias_weights", "is not implemented here; send an empty list or leave it out")
    given = {n: v for n in ("min_length", "min_tokens") if (v := scalar(arrays, n, int)) is not None}
    if len(set(given.values())) > 1:
        raise InputError("min_length", f"min_length {given['min_length']} and min_tokens {given['min_tokens']} "
                                       "disagree; send one of them")
    least = next(iter(given.values()), 0)
    name = next(iter(given), "min_tokens")
    if not 0 <= least <= max_tokens:
        raise InputError(name, f"must be in [0, max_tokens = {max_tokens}], got {least}")
    if least and not min_tokens:
        raise InputError(name, "a minimum output length is not implemented on this model; send 0 or leave it out")
    return Options(min_tokens=least)


@dataclass
class Request:
    """One request's inputs, validated: the conversation for the chat template (images as
    `{"type": "image"}` items, in order) and the encoded images."""

    conversation: list[dict]
    images: list[bytes | str]  # encoded files, base64 or data URLs (str: as JSON gave them)
    max_tokens: int
    source: str  # the input the prompt came from: "text_input" or "messages"
    image_names: list[str] | None = None  # what an error about each image names
    options: Options = field(default_factory=Options)  # the TensorRT-LLM ensemble's optional inputs
    videos: list[bytes | str] = field(default_factory=list)  # encoded video files, base64 or data URLs
    video_names: list[str] | None = None  # what an error about each video names


@dataclass
class Prompt:
    """A tokenized request, ready for the vision encoder and the LLM."""

    input_ids: np.ndarray  # (L,) int32; image tokens are prompt-table ids vocab_size + j
    pixel_values: np.ndarray  # (num_patches, C * T * P * P) float32, every block's patches, in prompt order
    image_grid_thw: np.ndarray  # (blocks, 3) int64: the patch grid of each image and each video frame group
    num_image_tokens: int  # prompt-table rows: image and video tokens
    video_grid_thw: np.ndarray | None = None  # (videos, 3) int64, as transformers' processor gives it
    video_timestamps: list[list[float]] | None = None  # seconds of each video's frame groups, as the prompt says


def decode_image(data: bytes | str, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_bytes: int | None = None) -> Image.Image:
    """Decode an encoded image file, a base64 string of one, or a `data:` URL, to RGB."""
    if isinstance(data, str):
        data = data.encode()
    raw = bytes(data)
    if max_bytes is not None:
        _check_bytes(name, raw, max_bytes)
    if raw[:5].lower() == b"data:":
        header, sep, payload = raw.partition(b",")
        if not sep or not header.endswith(b";base64"):
            raise InputError(name, "a data URL must look like data:image/<type>;base64,<payload>")
        raw = _b64(payload, name)
    elif not raw:
        raise InputError(name, "is empty")
    image = _open(raw, name, max_pixels)
    if image is None:
        try:
            decoded = _b64(raw, name)
        except InputError:
            decoded = None
        image = _open(decoded, name, max_pixels) if decoded else None
    if image is None:
        raise InputError(name, "cannot be decoded: not an image file (PNG, JPEG, WebP, ...) nor base64 of one")
    _check_size(name, *image.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise InputError(name, f"cannot be decoded: {type(exc).__name__}: {exc}") from None


def encoded_file(data: bytes | str, name: str, kind: str = "video") -> bytes:
    """The file a `data:` URL, base64 text or the raw bytes carry."""
    raw = bytes(data.encode() if isinstance(data, str) else data)
    if raw[:5].lower() == b"data:":
        header, sep, payload = raw.partition(b",")
        if not sep or not header.endswith(b";base64"):
            raise InputError(name, f"a data URL must look like data:{kind}/<type>;base64,<payload>")
        return _b64(payload, name)
    if not raw:
        raise InputError(name, "is empty")
    if _BASE64.match(raw[:256]) and len(raw) % 4 == 0:
        try:
            return base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            pass
    return raw


def _check_bytes(name: str, data: bytes, max_bytes: int) -> None:
    size = encoded_size(data)
    if size > max_bytes:
        raise InputError(name, f"is {size} bytes, above the limit of {max_bytes}")


def check_images(images: list[bytes | str], names: list[str], limits: Limits, max_images: int,
                 source: str = "messages", videos: Sequence[bytes | str] = (),
                 video_names: Sequence[str] = ()) -> None:
    """The bounds on a request's images and videos that need no decoding: how many, and each one's
    bytes (the OpenAI endpoint checks them too, before it forwards a request)."""
    if len(images) > max_images:
        raise InputError("image" if source == "text_input" else "messages",
                         f"{len(images)} images given, at most {max_images} are allowed")
    if len(videos) > limits.video.count:
        raise InputError("video" if source == "text_input" else "messages",
                         f"{len(videos)} videos given, at most {limits.video.count} are allowed")
    for image, name in zip(images, names):
        _check_bytes(name, image, limits.image_bytes)
    for video, name in zip(videos, video_names):
        _check_bytes(name, video, limits.video.bytes)


def _b64(payload: bytes, name: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(name, "is not valid base64") from None


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InputError(name, f"has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(name, f"is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")


_BOMB = re.compile(r"\((\d+) pixels\)")


def _open(raw: bytes, name: str, max_pixels: int) -> Image.Image | None:
    """The image's header, parsed (None: not an image). Its declared size is checked first, so the
    pixel limit speaks before any decoder, Pillow's own decompression-bomb guard included."""
    declared = declared_size(raw)
    if declared is not None:
        _check_size(name, *declared[:2], max_pixels)
    try:
        image = Image.open(io.BytesIO(raw))
        image.size  # noqa: B018 -- header parsed
        return image
    except Image.DecompressionBombError as exc:  # a format whose header is not read here
        m = _BOMB.search(str(exc))
        size = f"{m.group(1)} pixels" if m else f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels"
        raise InputError(name, f"is {size}, above the limit of {max_pixels}") from None
    except Exception:
        return None


class PixelCache:
    """The pixel values and patch grid of recent images, by the SHA-256 of the image as the request
    gave it (file bytes, base64 or a data URL), bounded in bytes, least recently used dropped first.
    The same bytes decode and patchify to the same pixels, so a hit is exactly what a miss
    computes: a conversation sends its images again every turn, and they are decoded, resized
    and normalized once. Each `Preprocessor` has its own (one processor configuration, one
    pixel limit)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = self.misses = self.bytes = 0
        self._items: collections.OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(image: bytes | str) -> bytes:
        return hashlib.sha256(image.encode() if isinstance(image, str) else image).digest()

    def get(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: bytes, pixel_values: np.ndarray, grid: np.ndarray) -> None:
        size = pixel_values.nbytes + grid.nbytes
        if size > self.max_bytes:
            return
        pixel_values, grid = pixel_values.copy(), grid.copy()  # never a caller's array
        pixel_values.flags.writeable = grid.flags.writeable = False
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (pixel_values, grid)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (pv, g) = self._items.popitem(last=False)
                self.bytes -= pv.nbytes + g.nbytes


class Preprocessor:
    """Turns (prompt text, encoded images) into a `Prompt`, with the checkpoint's own processors.
    `pixel_cache_bytes`: the bound of its `PixelCache` (0: none; every image decoded every time)."""

    def __init__(self, spec: ModelSpec, max_images: int = 4, max_input_len: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, limits: Limits | None = None,
                 pixel_cache_bytes: int = 0):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.spec = spec
        self.max_images = max_images
        self.limits = limits or Limits()
        self.max_input_len = max_input_len or spec.max_position_embeddings
        self.max_image_pixels = max_image_pixels
        self.pixel_cache = PixelCache(pixel_cache_bytes) if pixel_cache_bytes else None
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(spec.path))
        if self.image_processor.patch_size != spec.patch_size:
            raise ValueError("preprocessor_config.json patch_size disagrees with the vision tower")
        from qwen3vl_triton.text.video import VideoReader

        self.videos = VideoReader(spec, self.tokenizer, self.limits.video)

    def chat_text(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """The prompt layout: one user message, the images, the videos in order, then the text."""
        return self.template(single_turn(text, num_images, num_videos))

    def template(self, conversation: list[dict]) -> str:
        """The checkpoint's chat template over a conversation, with the generation prompt."""
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def images(self, images: list[bytes | str], names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decode and patchify images -> (pixel_values, image_grid_thw); images the pixel cache
        holds are neither decoded nor patchified again."""
        names = names or [f"image[{i}]" for i in range(len(images))]
        cache = self.pixel_cache
        keys = [cache.key(img) for img in images] if cache is not None else [None] * len(images)
        cached = [cache.get(k) if cache is not None else None for k in keys]
        decoded = [None if hit is not None else decode_image(img, name, self.max_image_pixels, self.limits.image_bytes)
                   for img, name, hit in zip(images, names, cached)]
        if not decoded:
            patch_dim = 3 * self.spec.temporal_patch_size * self.spec.patch_size ** 2
            return np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64)
        pixel_values, grids = [], []
        for name, img, hit, key in zip(names, decoded, cached, keys):
            if hit is not None:
                pixel_values.append(hit[0])
                grids.append(hit[1])
                continue
            try:
                out = self.image_processor(images=[img], return_tensors="np")
            except ValueError as exc:  # e.g. an aspect ratio the resize rule refuses
                raise InputError(name, str(exc)) from None
            pixel_values.append(np.asarray(out["pixel_values"], dtype=np.float32))
            grids.append(np.asarray(out["image_grid_thw"], dtype=np.int64))
            if cache is not None:
                cache.put(key, pixel_values[-1], grids[-1])
        return np.concatenate(pixel_values), np.concatenate(grids)

    def __call__(self, text: str, images: list[bytes | str], videos: Sequence[bytes | str] = ()) -> Prompt:
        if not isinstance(text, str):
            raise InputError("text_input", "must be a UTF-8 string")
        if len(text.encode("utf-8")) > self.limits.text_bytes:
            raise InputError("text_input", f"is {len(text.encode('utf-8'))} bytes, above the limit of "
                                           f"{self.limits.text_bytes}")
        return self.render(single_turn(text, len(images), len(videos)), images, "text_input", videos=list(videos))

    def request(self, req: Request) -> Prompt:
        """A validated request (parse_request) -> Prompt."""
        return self.render(req.conversation, req.images, req.source, req.image_names, req.videos, req.video_names)

    def render(self, conversation: list[dict], images: list[bytes | str], source: str = "messages",
               image_names: list[str] | None = None, videos: Sequence[bytes | str] = (),
               video_names: Sequence[str] | None = None) -> Prompt:
        """Template a conversation whose images are `{"type": "image"}` items, in the order of `images`,
        and whose videos are `{"type": "video"}` items, in the order of `videos`."""
        names = image_names or [f"image[{i}]" for i in range(len(images))]
        vnames = list(video_names or [f"video[{i}]" for i in range(len(videos))])
        check_images(images, names, self.limits, self.max_images, source, videos, vnames)
        pixel_values, grid_thw = self.images(images, names)
        decoded = [self.videos(encoded_file(v, n), n) for v, n in zip(videos, vnames)]
        text = self.template(conversation)
        video_token = self.videos.prompt.video_token
        if text.count(video_token) != len(decoded):
            raise InputError(source, "must not contain video placeholder tokens")
        ids = self.tokenizer(self.videos.expand(text, decoded), add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        image_at = np.flatnonzero(ids == self.spec.image_token_id)
        if image_at.size != len(images):
            raise InputError(source, "must not contain image placeholder tokens")
        merge = self.spec.spatial_merge_size ** 2
        # the blocks of the prompt table, in prompt order: (position, tokens in the prompt, patches, grid)
        blocks, start = [], 0
        for at, g in zip(image_at, grid_thw):
            blocks.append((int(at), 1, pixel_values[start:start + int(np.prod(g))], g))
            start += int(np.prod(g))
        is_video = ids == self.spec.video_token_id
        runs = np.flatnonzero(np.diff(np.concatenate([[0], is_video.astype(np.int8), [0]])))
        groups = iter(zip(runs[0::2], runs[1::2]))
        for v in decoded:
            t, h, w = (int(x) for x in v.grid_thw)
            for k in range(t):
                at, end = next(groups, (None, None))
                if at is None or end - at != h * w // merge:
                    raise InputError(source, "must not contain video placeholder tokens")
                blocks.append((int(at), h * w // merge, v.pixel_values[k * h * w:(k + 1) * h * w],
                               np.array([1, h, w], np.int64)))
        if next(groups, None) is not None:
            raise InputError(source, "must not contain video placeholder tokens")
        blocks.sort(key=lambda b: b[0])
        pieces, start, row = [], 0, 0
        for at, length, _, g in blocks:
            n = int(np.prod(g)) // merge
            pieces.append(ids[start:at])
            pieces.append(np.arange(self.spec.vocab_size + row, self.spec.vocab_size + row + n))
            row += n
            start = at + length
        pieces.append(ids[start:])
        input_ids = np.concatenate(pieces).astype(np.int32)
        if input_ids.size >= self.max_input_len:
            raise InputError(
                source,
                f"the prompt is {input_ids.size} tokens ({'images and videos' if decoded else 'images'} included), "
                f"the context limit is {self.max_input_len}",
            )
        patch_dim = 3 * self.spec.temporal_patch_size * self.spec.patch_size ** 2
        pixels = (np.concatenate([b[2] for b in blocks]) if blocks else np.zeros((0, patch_dim), np.float32))
        grids = np.stack([b[3] for b in blocks]) if blocks else np.zeros((0, 3), np.int64)
        return Prompt(input_ids, pixels.astype(np.float32, copy=False), grids.astype(np.int64), row,
                      np.stack([v.grid_thw for v in decoded]) if decoded else np.zeros((0, 3), np.int64),
                      [v.timestamps for v in decoded])


def single_turn(text: str, num_images: int, num_videos: int = 0) -> list[dict]:
    """The `text_input` prompt layout: one user message, the images, the videos in order, then the text."""
    media = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
    return [{"role": "user", "content": media + [{"type": "text", "text": text}]}]


def _image_url(part: dict, name: str, kind: str = "image") -> str:
    """The file of an `image_url` (or `video_url`) part: a data URL or raw base64 (remote image URLs
    are the HTTP frontend's to fetch, for hosts its operator allowed; the model server never fetches)."""
    key = f"{kind}_url"
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InputError(f"{name}.{key}", 'must be {"url": "<data URL or base64>"}')
    scheme = url[:12].lower()
    if scheme.startswith(("http://", "https://")):
        where = " (an OpenAI endpoint fetches hosts its operator allowed)" if kind == "image" else ""
        raise InputError(f"{name}.{key}", f"remote URLs are not fetched here: send the {kind} as a data URL or "
                                          f"base64{where}")
    if not scheme.startswith("data:") and re.match(r"^[a-z][a-z0-9+.-]*:", scheme):
        raise InputError(f"{name}.{key}", f"URL scheme {url.split(':', 1)[0]!r} is not supported: send a data "
                                          "URL or base64")
    return url  # encoded only to be decoded (a data URL may be megabytes)


def parse_messages(raw, limits: Limits, videos: list | None = None,
                   video_names: list | None = None) -> tuple[list[dict], list[str], list[str]]:
    """OpenAI chat messages (JSON text or parsed) -> the chat template's conversation and the images,
    in order; `video_url` parts (vLLM's convention) go to `videos` and `video_names` when given, and
    are refused otherwise. Images and videos are allowed in user messages; text parts and string
    contents anywhere."""
    if isinstance(raw, (bytes, bytearray, str)):
        raw = untrusted.loads(raw, "messages")  # bounded nesting, no lone surrogates, no huge numbers
    else:
        untrusted.check(raw, "messages")
    if not isinstance(raw, list) or not raw:
        raise InputError("messages", "must be a non-empty JSON array of chat messages")
    conversation, images, names, text_bytes = [], [], [], 0
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InputError(where, 'must be an object {"role": ..., "content": ...}')
        role = msg.get("role")
        role = "system" if role == "developer" else role  # the OpenAI API's newer name for it
        if role not in ROLES:
            raise InputError(f"{where}.role", f"{untrusted.short(role)} is not one of {', '.join(ROLES)} "
                                              "(or developer)")
        content = msg.get("content")
        if isinstance(content, str):
            text_bytes += len(content.encode("utf-8"))
            conversation.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"{where}.content", "must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            name = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise InputError(f"{name}.text", "must be a string")
                text_bytes += len(text.encode("utf-8"))
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                if role != "user":
                    raise InputError(name, f"images go in user messages, not in {role} messages")
                images.append(_image_url(part, name))
                names.append(f"{name}.image_url")
                parts.append({"type": "image"})
            elif kind == "video_url" and videos is not None:
                if role != "user":
                    raise InputError(name, f"videos go in user messages, not in {role} messages")
                videos.append(_image_url(part, name, "video"))
                video_names.append(f"{name}.video_url")
                parts.append({"type": "video"})
            else:
                allowed = "text, image_url or video_url" if videos is not None else "text or image_url"
                raise InputError(f"{name}.type", f"{untrusted.short(kind)} is not supported: parts are {allowed}")
        conversation.append({"role": role, "content": parts})
    if text_bytes > limits.text_bytes:
        raise InputError("messages", f"the text is {text_bytes} bytes, above the limit of {limits.text_bytes}")
    return conversation, images, names


def _one_string(arrays: dict, name: str):
    value = arrays.get(name)
    if value is None:
        return None
    if value.size != 1:
        raise InputError(name, f"expected one string, got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def _nbytes(value) -> int:
    if value is None:
        return 0
    if value.dtype == np.object_:
        return sum(len(x) for x in value.reshape(-1))
    return value.nbytes


def parse_request(arrays: dict, max_output_len: int, limits: Limits | None = None,
                  end_ids: Sequence[int] = ()) -> Request:
    """The `qwen3vl` inputs of one request, bounded and validated before any work is done on them
    (the TensorRT-LLM ensemble's optional inputs by `parse_options`, with the checkpoint's `end_ids`)."""
    from qwen3vl_triton.arrays import scalar

    limits = limits or Limits()
    total = sum(_nbytes(v) for v in arrays.values())
    if total > limits.request_bytes:
        raise InputError("request", f"is {total} bytes, above the limit of {limits.request_bytes}")
    text, messages = _one_string(arrays, "text_input"), _one_string(arrays, "messages")
    images = arrays.get("image")
    images = [] if images is None else [bytes(x) if not isinstance(x, str) else x.encode() for x in images.reshape(-1)]
    videos = arrays.get("video")
    videos = [] if videos is None else [bytes(x) if not isinstance(x, str) else x.encode() for x in videos.reshape(-1)]
    max_tokens = scalar(arrays, "max_tokens", int, required=True)
    if not 1 <= max_tokens <= max_output_len:
        raise InputError("max_tokens", f"must be in [1, {max_output_len}], got {max_tokens}")
    options = parse_options(arrays, max_tokens, end_ids)
    if messages is not None:
        if text is not None:
            raise InputError("messages", "give text_input or messages, not both")
        if images:
            raise InputError("image", "with messages, images go in the messages' image_url parts")
        if videos:
            raise InputError("video", "with messages, videos go in the messages' video_url parts")
        video_names: list[str] = []
        conversation, images, names = parse_messages(messages, limits, videos, video_names)
        return Request(conversation, images, max_tokens, "messages", names, options, videos, video_names)
    if text is None:
        raise InputError("text_input", "is required (or messages)")
    if isinstance(text, bytes) and len(text) > limits.text_bytes:
        raise InputError("text_input", f"is {len(text)} bytes, above the limit of {limits.text_bytes}")
    prompt = untrusted.text(text, "text_input")
    return Request(single_turn(prompt, len(images), len(videos)), images, max_tokens, "text_input", options=options,
                   videos=videos)


def parse_generate_inputs(arrays: dict, max_output_len: int) -> tuple[str, list[bytes], int]:
    """(prompt, encoded images, max_tokens) from `text_input` + `image` inputs of one request."""
    req = parse_request(arrays, max_output_len)
    if req.source != "text_input":
        raise InputError("messages", "this entry point takes text_input")
    return req.conversation[0]["content"][-1]["text"], req.images, req.max_tokens
