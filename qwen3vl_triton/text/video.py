"""Video input: an encoded video file -> sampled frames -> patches, timestamps and their prompt text.

Every step is transformers' own, as its Qwen3-VL video processor runs it:

- decoding: `transformers.video_utils.read_video_pyav` (PyAV), which decodes up to the last frame
  it keeps and converts only the frames it keeps;
- sampling: `Qwen3VLVideoProcessor.sample_frames` (the checkpoint's `fps`, `min_frames`,
  `max_frames`, from `video_preprocessor_config.json`);
- resizing, rescaling, normalizing and patchifying: the processor's own `_preprocess` (its
  `smart_resize` rule and `patchify`). Two primitives it takes from torchvision are given here,
  because torchvision's CPU wheels do not load beside this CPU torch: the resize kernel, as
  torchvision's `resize_image` runs it on a CPU tensor (uint8 frames with bicubic: torch's native
  uint8 `interpolate` with antialias; any other dtype: float32 -> `interpolate` -> clamp -> round),
  and `normalize` (`(x - mean) / std` per channel, as `torchvision.transforms.v2.functional.normalize`);
- the prompt text: `Qwen3VLProcessor.replace_video_token` (a `<t seconds>` timestamp before each
  group of `temporal_patch_size` frames, from `_calculate_timestamps`) and
  `get_text_with_replacements`.

Limits come before work: the file's bytes, then what its container declares (frame size, frame
count, duration), read before any frame is decoded; then the pixels of the frames kept.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qwen3vl_triton.errors import InputError

if TYPE_CHECKING:
    from qwen3vl_triton.model.checkpoint import ModelSpec


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on each video of a request, checked before its frames are decoded (all but `pixels`,
    checked before they are converted). `frames`: frames the container declares (every frame up to
    the last one kept is decoded); `seconds`: its declared duration; `frame_pixels`: width x height
    of a frame; `pixels`: the pixels of the frames kept, all together (what is held and resized)."""

    count: int = 2
    bytes: int = 32 * 2**20
    frames: int = 18_000
    seconds: float = 600.0
    frame_pixels: int = 3840 * 2160
    pixels: int = 2**28


@dataclass
class Video:
    """One decoded, processed video."""

    pixel_values: np.ndarray  # (T * h * w, C * temporal_patch_size * P * P) float32, patchified frames
    grid_thw: np.ndarray  # (3,) int64: frame groups, patch rows, patch columns
    placeholder: str  # the prompt text that replaces the video's <|video_pad|>: timestamps and pads
    timestamps: list[float]  # seconds of each frame group, as the prompt states them (rounded to 0.1)
    frames_indices: list[int]  # the frames kept


def _video_processor_class():
    """transformers' Qwen3-VL video processor, with the two torchvision primitives it calls given
    here (see the module's docstring); everything else is transformers' code."""
    import torch
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class _TensorPrimitives(BaseVideoProcessor):
        def resize(self, image, size, resample=None, antialias=True, **kwargs):
            # torchvision.transforms.v2.functional.resize_image on a CPU tensor, BICUBIC (the resample
            # of Qwen3-VL's video processor): uint8 is resized natively; other dtypes go through float32
            if int(resample) != 3:  # PILImageResampling.BICUBIC
                raise ValueError(f"only bicubic resizing is implemented here, the processor asks for {resample}")
            shape = image.shape
            new = [size.height, size.width]
            if list(shape[-2:]) == new:
                return image
            flat = image.reshape(-1, *shape[-3:])
            if flat.dtype == torch.uint8 or flat.dtype in (torch.float32, torch.float64):
                out = torch.nn.functional.interpolate(flat, size=new, mode="bicubic", align_corners=False,
                                                      antialias=antialias)
            else:
                out = torch.nn.functional.interpolate(flat.to(torch.float32), size=new, mode="bicubic",
                                                      align_corners=False, antialias=antialias)
                out = out.clamp_(0, 255).round_().to(flat.dtype)
            return out.reshape(*shape[:-2], *new)

        def normalize(self, image, mean, std, inplace=False, **kwargs):
            image = image if inplace else image.clone()
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return image.sub_(mean).div_(std)

    # Qwen3VLVideoProcessor.resize ends with super().resize(...): this class comes next in the MRO
    return type("Qwen3VLVideoProcessorCPU", (Qwen3VLVideoProcessor, _TensorPrimitives), {})


def load_video_processor(path):
    """The checkpoint's video processor (`video_preprocessor_config.json`; transformers falls back to
    `preprocessor_config.json` when a checkpoint has none)."""
    return _video_processor_class().from_pretrained(str(path))


def _prompt_processor(tokenizer, video_processor):
    """transformers' Qwen3VLProcessor for its prompt rules (`replace_video_token`,
    `get_text_with_replacements`). Its constructor checks each part's class against transformers'
    registry of video processors, which is empty without torchvision, so the parts are set directly."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    p = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    p.tokenizer, p.video_processor = tokenizer, video_processor
    p.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
    p.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
    p.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
    p.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
    return p


def _av_error(exc: Exception) -> str:
    """FFmpeg's reason, without the errno and the '<none>' file name PyAV adds for an in-memory file."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).split("; last error log:")[0]


def probe(raw: bytes, name: str, limits: VideoLimits) -> None:
    """What the container declares, checked against `limits` before any frame is decoded."""
    import av

    try:
        container = av.open(io.BytesIO(raw), mode="r")
    except Exception as exc:  # noqa: BLE001 -- any failure to parse the container is the input's
        raise InputError(name, f"cannot be decoded: not a complete video file in a format FFmpeg reads "
                               f"({_av_error(exc)})") from None
    with container:
        kind = container.format.name or ""
        if kind.endswith("_pipe") or kind in ("image2", "gif", "apng", "webp"):  # FFmpeg's still-image demuxers
            raise InputError(name, f"is an image ({kind.removesuffix('_pipe')}), not a video: send it as an image")
        if not container.streams.video:
            raise InputError(name, "has no video stream (or a video track without frames)")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise InputError(name, "has a video stream in a codec this server cannot decode")
        width, height = int(stream.width or 0), int(stream.height or 0)
        if width < 1 or height < 1:
            raise InputError(name, f"declares frames of zero size ({width}x{height})")
        if width * height > limits.frame_pixels:
            raise InputError(name, f"has {width}x{height} = {width * height} pixels per frame, above the limit of "
                                   f"{limits.frame_pixels}")
        frames = int(stream.frames or 0)
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        seconds = [frames / fps if fps else 0.0]
        if container.duration:
            seconds.append(container.duration / 1e6)
        if stream.duration and stream.time_base:
            seconds.append(float(stream.duration * stream.time_base))
        if max(seconds) > limits.seconds:
            raise InputError(name, f"lasts {max(seconds):.1f} seconds, above the limit of {limits.seconds:g}")
        if frames > limits.frames:
            raise InputError(name, f"has {frames} frames, above the limit of {limits.frames}")
        if frames < 1:
            raise InputError(name, "declares no frames (a container that states its frame count, such as MP4, "
                                   "with at least one frame is needed)")
        if not fps:
            raise InputError(name, "declares no frame rate")


class VideoReader:
    """Decodes and processes videos for one checkpoint (its video processor and tokenizer)."""

    def __init__(self, spec: ModelSpec, tokenizer, limits: VideoLimits | None = None):
        self.spec = spec
        self.limits = limits or VideoLimits()
        self.processor = load_video_processor(spec.path)
        for key, ours in (("patch_size", spec.patch_size), ("temporal_patch_size", spec.temporal_patch_size),
                          ("merge_size", spec.spatial_merge_size)):
            if getattr(self.processor, key) != ours:
                raise ValueError(f"video_preprocessor_config.json {key} {getattr(self.processor, key)} disagrees "
                                 f"with the vision tower's {ours}")
        self.prompt = _prompt_processor(tokenizer, self.processor)

    def decode(self, raw: bytes, name: str) -> tuple[np.ndarray, object]:
        """(frames kept `[n, H, W, 3]` uint8, transformers' VideoMetadata with `frames_indices`)."""
        from transformers.video_utils import read_video_pyav

        probe(raw, name, self.limits)

        def sample(metadata, **kwargs):  # read_video_pyav calls this before it decodes a frame
            indices = self.processor.sample_frames(metadata)
            kept = len(indices) * int(metadata.width) * int(metadata.height)
            if kept > self.limits.pixels:
                raise InputError(name, f"keeps {len(indices)} frames of {metadata.width}x{metadata.height} = {kept} "
                                       f"pixels, above the limit of {self.limits.pixels}")
            return indices

        try:
            frames, metadata = read_video_pyav(io.BytesIO(raw), sample_indices_fn=sample)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a stream cut short or corrupt: the input's fault
            raise InputError(name, f"cannot be decoded: the video is truncated or corrupt ({_av_error(exc)})") from None
        if frames.shape[0] != len(metadata.frames_indices):
            raise InputError(name, f"is truncated: {frames.shape[0]} of the {len(metadata.frames_indices)} frames to "
                                   f"sample could be decoded")
        return frames, metadata

    def process(self, frames: np.ndarray, metadata, name: str) -> Video:
        """Frames kept -> patches and grid (the processor's `_preprocess`) and the prompt text."""
        import torch

        p = self.processor
        # channels first, as the processor's _prepare_input_videos makes them
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
        try:
            out = p._preprocess(
                [video], do_resize=p.do_resize, size=p.size, resample=p.resample, do_rescale=p.do_rescale,
                rescale_factor=p.rescale_factor, do_normalize=p.do_normalize, image_mean=tuple(p.image_mean),
                image_std=tuple(p.image_std), patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                merge_size=p.merge_size, cap_pixels_per_frame=bool(p.cap_pixels_per_frame), return_tensors=None)
        except ValueError as exc:  # e.g. an aspect ratio smart_resize refuses
            raise InputError(name, str(exc)) from None
        pixel_values = out["pixel_values_videos"].numpy().astype(np.float32, copy=False)
        grid = np.asarray(out["video_grid_thw"], dtype=np.int64).reshape(-1, 3)[0]
        inputs = {"video_grid_thw": torch.from_numpy(grid[None]), "video_metadata": [metadata]}
        placeholder = self.prompt.replace_video_token(inputs, 0)
        times = self.prompt._calculate_timestamps(metadata.frames_indices, metadata.fps, p.temporal_patch_size)
        return Video(pixel_values, grid, placeholder, [round(t, 1) for t in times],
                     [int(i) for i in metadata.frames_indices])

    def __call__(self, raw: bytes, name: str) -> Video:
        return self.process(*self.decode(raw, name), name)

    def expand(self, text: str, videos: list[Video]) -> str:
        """The templated prompt with each video's `<|video_pad|>` replaced by its placeholder, in order
        (transformers' `get_text_with_replacements`)."""
        if not videos:
            return text
        return self.prompt.get_text_with_replacements([text], videos_replacements=[v.placeholder for v in videos])[0][0]
