"""The mixed, seeded request workload of the load tests.

Requests are text only, one image, or two images; image sizes run from small to the model's pixel
limit (`max_pixels` of the checkpoint's preprocessor_config.json, read through ModelSpec, or set
directly). Every image is generated from the seed, so two runs with the same seed send the same
bytes. Images are encoded once, when the workload is built, not per request.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = (
    "Describe this image in short.",
    "What stands out here?",
    "Write one sentence about what you see.",
    "List the main colours.",
)
TEXT_PROMPTS = (
    "Tell me about the ocean.",
    "Write a haiku about mountains.",
    "Explain what a load test measures.",
)
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)


@dataclass(frozen=True)
class Case:
    kind: str  # "text", "1 image" or "2 images"
    prompt: str
    images: tuple[bytes, ...]
    sizes: tuple[tuple[int, int], ...]  # (width, height) of each image
    max_tokens: int

    @property
    def label(self) -> str:
        return self.kind if not self.sizes else f"{self.kind} " + " + ".join(f"{w}x{h}" for w, h in self.sizes)


def pixel_limits(checkpoint: str | Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the checkpoint's preprocessor_config.json."""
    from qwen3vl_triton.model.checkpoint import ModelSpec

    spec = ModelSpec.load(checkpoint)
    return spec.min_pixels, spec.max_pixels


def image_sizes(count: int, max_pixels: int, min_pixels: int | None = None) -> list[tuple[int, int]]:
    """`count` (width, height) pairs, pixel counts geometric from small to `max_pixels` (the last one
    is at the limit, within rounding), with varied aspect ratios; every w * h <= max_pixels."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    small = min(max_pixels, min_pixels or 32 * 32)
    sizes = []
    for i in range(count):
        frac = i / (count - 1) if count > 1 else 1.0
        pixels = small * (max_pixels / small) ** frac
        aspect = ASPECTS[i % len(ASPECTS)]
        w = min(max_pixels, max(1, round(math.sqrt(pixels * aspect))))
        h = max(1, min(int(pixels) // w, max_pixels // w))  # w <= max_pixels, so h >= 1 and w * h <= max_pixels
        sizes.append((w, h))
    return sizes


def make_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A deterministic image with structure and noise, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), ((x + y) * 3) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def make_video(seconds: float = 3.0, fps: int = 30, width: int = 160, height: int = 120, seed: int = 0,
               codec: str = "libx264", fmt: str = "mp4", frames: int | None = None) -> bytes:
    """A deterministic synthetic video written with PyAV: a red disc crossing left to right, a green
    square crossing the other way, over a gradient whose hue depends on `seed`."""
    import av

    buf = io.BytesIO()
    count = frames if frames is not None else int(round(seconds * fps))
    y, x = np.mgrid[0:height, 0:width]
    base = np.zeros((height, width, 3), np.uint8)
    base[..., (2 + seed) % 3] = (x * 255 // max(width, 1)).astype(np.uint8)
    base[..., (1 + seed) % 3] = (y * 128 // max(height, 1)).astype(np.uint8)
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            img = base.copy()
            cx, r = int(i / max(count, 1) * width), max(height // 8, 2)
            img[(x - cx) ** 2 + (y - height // 2) ** 2 < r * r] = (230, 30, 30)
            img[(abs(x - (width - cx)) < r) & (abs(y - height // 4) < r)] = (30, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()



@dataclass
class Workload:
    cases: list[Case]
    weights: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, max_pixels: int, min_pixels: int | None = None, seed: int = 0, max_tokens: int = 32,
              sizes: int = 4) -> "Workload":
        """One text-only, one 1-image case per size and 2-image pairs (small + large, and neighbours);
        each kind (text, 1 image, 2 images) is a third of the requests."""
        rng = random.Random(seed)
        dims = image_sizes(sizes, max_pixels, min_pixels)
        images = [make_image(w, h, seed * 1000 + i, "PNG" if i % 2 == 0 else "JPEG") for i, (w, h) in enumerate(dims)]
        text = [Case("text", p, (), (), max_tokens) for p in TEXT_PROMPTS]
        one = [Case("1 image", rng.choice(PROMPTS), (img,), (d,), max_tokens) for img, d in zip(images, dims)]
        pairs = sorted({(0, len(dims) - 1), *((i, i + 1) for i in range(len(dims) - 1))})
        two = [Case("2 images", "Compare the two images.", (images[a], images[b]), (dims[a], dims[b]), max_tokens)
               for a, b in pairs]
        cases = text + one + two
        weights = [1 / len(group) for group in (text, one, two) for _ in group]
        return cls(cases, weights)

    def pick(self, rng: random.Random) -> Case:
        return rng.choices(self.cases, self.weights)[0]
