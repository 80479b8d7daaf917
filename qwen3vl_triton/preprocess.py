"""Request preprocessing: chat template, tokenization, image decode, resize/patchify, placeholders.

The checkpoint's own tokenizer, chat template and image processor (transformers' Qwen2-VL
image processor configured by `preprocessor_config.json`) do the work; this module validates
inputs and replaces each image placeholder by the prompt-table ids the LLM reads.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .checkpoint import ModelSpec
from .errors import InputError

# Decoding a bigger image than this is refused before its pixels are decoded.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class Prompt:
    """A tokenized request, ready for the vision encoder and the LLM."""

    input_ids: np.ndarray  # (L,) int32; image tokens are prompt-table ids vocab_size + j
    pixel_values: np.ndarray  # (num_patches, C * T * P * P) float32, all images concatenated
    image_grid_thw: np.ndarray  # (num_images, 3) int64, patch grid of each image
    num_image_tokens: int


def decode_image(data: bytes | str, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an encoded image file, a base64 string of one, or a `data:` URL, to RGB."""
    if isinstance(data, str):
        data = data.encode()
    raw = bytes(data)
    if raw[:5].lower() == b"data:":
        header, sep, payload = raw.partition(b",")
        if not sep or not header.endswith(b";base64"):
            raise InputError(name, "a data URL must look like data:image/<type>;base64,<payload>")
        raw = _b64(payload, name)
    elif not raw:
        raise InputError(name, "is empty")
    image = _open(raw)
    if image is None:
        try:
            decoded = _b64(raw, name)
        except InputError:
            decoded = None
        image = _open(decoded) if decoded else None
    if image is None:
        if _png_zero_size(raw):
            raise InputError(name, "has zero size")
        raise InputError(name, "cannot be decoded: not an image file (PNG, JPEG, WebP, ...) nor base64 of one")
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(name, f"has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(name, f"is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise InputError(name, f"cannot be decoded: {type(exc).__name__}: {exc}") from None


def _b64(payload: bytes, name: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(name, "is not valid base64") from None


def _png_zero_size(raw: bytes) -> bool:
    """A PNG whose header declares a zero width or height (Pillow refuses to identify it)."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or len(raw) < 24:
        return False
    width, height = struct.unpack(">II", raw[16:24])
    return width == 0 or height == 0


def _open(raw: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(raw))
        image.size  # noqa: B018 -- header parsed
        return image
    except Exception:
        return None


class Preprocessor:
    """Turns (prompt text, encoded images) into a `Prompt`, with the checkpoint's own processors."""

    def __init__(self, spec: ModelSpec, max_images: int = 4, max_input_len: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.spec = spec
        self.max_images = max_images
        self.max_input_len = max_input_len or spec.max_position_embeddings
        self.max_image_pixels = max_image_pixels
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(spec.path))
        if self.image_processor.patch_size != spec.patch_size:
            raise ValueError("preprocessor_config.json patch_size disagrees with the vision tower")

    def chat_text(self, text: str, num_images: int) -> str:
        """The prompt layout: one user message, the images in order, then the text."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def images(self, images: list[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
        """Decode and patchify images -> (pixel_values, image_grid_thw)."""
        decoded = [decode_image(img, f"image[{i}]", self.max_image_pixels) for i, img in enumerate(images)]
        if not decoded:
            patch_dim = 3 * self.spec.temporal_patch_size * self.spec.patch_size ** 2
            return np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64)
        pixel_values, grids = [], []
        for i, img in enumerate(decoded):
            try:
                out = self.image_processor(images=[img], return_tensors="np")
            except ValueError as exc:  # e.g. an aspect ratio the resize rule refuses
                raise InputError(f"image[{i}]", str(exc)) from None
            pixel_values.append(np.asarray(out["pixel_values"], dtype=np.float32))
            grids.append(np.asarray(out["image_grid_thw"], dtype=np.int64))
        return np.concatenate(pixel_values), np.concatenate(grids)

    def __call__(self, text: str, images: list[bytes | str]) -> Prompt:
        if not isinstance(text, str):
            raise InputError("text_input", "must be a UTF-8 string")
        if len(images) > self.max_images:
            raise InputError("image", f"{len(images)} images given, at most {self.max_images} are allowed")
        pixel_values, grid_thw = self.images(images)
        ids = self.tokenizer(self.chat_text(text, len(images)), add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        placeholder = np.flatnonzero(ids == self.spec.image_token_id)
        if placeholder.size != len(images):
            raise InputError("text_input", "must not contain image placeholder tokens")
        merge = self.spec.spatial_merge_size ** 2
        counts = [int(np.prod(g)) // merge for g in grid_thw]
        pieces, start, row = [], 0, 0
        for at, n in zip(placeholder, counts):
            pieces.append(ids[start:at])
            pieces.append(np.arange(self.spec.vocab_size + row, self.spec.vocab_size + row + n))
            row += n
            start = at + 1
        pieces.append(ids[start:])
        input_ids = np.concatenate(pieces).astype(np.int32)
        if input_ids.size >= self.max_input_len:
            raise InputError(
                "text_input",
                f"the prompt is {input_ids.size} tokens (images included), the context limit is {self.max_input_len}",
            )
        return Prompt(input_ids, pixel_values, grid_thw, row)


def parse_generate_inputs(arrays: dict, max_output_len: int) -> tuple[str, list[bytes], int]:
    """(prompt, encoded images, max_tokens) from the `qwen3vl` inputs of one request."""
    from .backend import scalar

    text = arrays.get("text_input")
    if text is None:
        raise InputError("text_input", "is required")
    if text.size != 1:
        raise InputError("text_input", f"expected one string, got shape {list(text.shape)}")
    raw = text.reshape(-1)[0]
    try:
        prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise InputError("text_input", "is not valid UTF-8") from None
    images = arrays.get("image")
    images = [] if images is None else [bytes(x) if not isinstance(x, str) else x.encode() for x in images.reshape(-1)]
    max_tokens = scalar(arrays, "max_tokens", int, required=True)
    if not 1 <= max_tokens <= max_output_len:
        raise InputError("max_tokens", f"must be in [1, {max_output_len}], got {max_tokens}")
    return prompt, images, max_tokens
