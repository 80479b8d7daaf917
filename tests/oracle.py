"""The numerical oracle: transformers' Qwen3VLMoeForConditionalGeneration on the same checkpoint.

Inputs are built the way a transformers user builds them (chat template, the checkpoint's image
processor, `<|image_pad|>` repeated per image, `mm_token_type_ids`), independently of the
package's preprocessing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from load_tests.workload import make_video as video_bytes  # noqa: F401 -- the synthetic videos of tests


@dataclass
class OracleInputs:
    input_ids: torch.Tensor  # (1, L) with image_token_id / video_token_id placeholders
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    text: str = ""  # the prompt, placeholders expanded

    def kwargs(self) -> dict:
        kw = dict(input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                  mm_token_type_ids=self.mm_token_type_ids)
        if self.pixel_values is not None:
            kw.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.pixel_values_videos is not None:
            kw.update(pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw)
        return kw


class Oracle:
    def __init__(self, path):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen3VLMoeForConditionalGeneration

        self.path = path
        self.config = AutoConfig.from_pretrained(str(path))
        self.model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        self.end_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token)
        # generation ends at the end of turn and at every eos id of generation_config.json
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.end_ids = list(dict.fromkeys([self.end_id, *eos]))

    def inputs(self, prompt: str, images: list[bytes], videos: list[bytes] = ()) -> OracleInputs:
        content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
                   + [{"type": "text", "text": prompt}])
        return self.conversation_inputs([{"role": "user", "content": content}], images, videos)

    def conversation_inputs(self, conversation: list[dict], images: list[bytes], videos=()) -> OracleInputs:
        """A conversation whose images are {"type": "image"} items, `images` in their order, and whose
        videos are {"type": "video"} items, `videos` in their order."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        video_values = video_grid = None
        if videos:
            video_values, video_grid, text = self.video_inputs(text, list(videos))
        pixel_values = grid = None
        if images:
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
            out = self.image_processor(images=pil, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            pad = "<|image_pad|>"
            parts = text.split(pad)
            text = parts[0] + "".join(pad * (int(g.prod()) // merge) + rest for g, rest in zip(grid, parts[1:]))
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        mm = (ids == self.config.image_token_id).int() + 2 * (ids == self.config.video_token_id).int()
        return OracleInputs(ids, pixel_values, grid, mm, video_values, video_grid, text)

    def video_inputs(self, text: str, videos: list[bytes]):
        """(pixel_values_videos, video_grid_thw, the text with each <|video_pad|> expanded) for encoded
        videos, by transformers' Qwen3-VL pieces assembled here: every frame decoded with PyAV, the
        processor's `sample_frames`, `smart_resize` and `patchify`, torchvision's CPU resize of uint8
        frames (torch's native uint8 bicubic `interpolate` with antialias), the fused rescale and
        normalization, and the processor's `replace_video_token` for the prompt."""
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

        vp = Qwen3VLVideoProcessor.from_pretrained(str(self.path))
        values, grids, metas = [], [], []
        for raw in videos:
            frames, meta = decode_all_frames(raw)
            meta.frames_indices = vp.sample_frames(meta)
            video = torch.from_numpy(frames[meta.frames_indices]).permute(0, 3, 1, 2).contiguous()
            factor = vp.patch_size * vp.merge_size
            h, w = smart_resize(video.shape[0], video.shape[2], video.shape[3], vp.temporal_patch_size, factor,
                                vp.size.shortest_edge, vp.size.longest_edge)
            video = torch.nn.functional.interpolate(video, size=[h, w], mode="bicubic", align_corners=False,
                                                    antialias=True)
            mean = (torch.tensor(vp.image_mean) * (1.0 / vp.rescale_factor)).view(-1, 1, 1)
            std = (torch.tensor(vp.image_std) * (1.0 / vp.rescale_factor)).view(-1, 1, 1)
            video = (video.to(torch.float32) - mean) / std
            patches, t, gh, gw = vp.patchify(video[None], vp.patch_size, vp.merge_size, vp.temporal_patch_size)
            values.append(patches[0])
            grids.append([t, gh, gw])
            metas.append(meta)
        processor = Qwen3VLProcessor.__new__(Qwen3VLProcessor)  # its constructor needs torchvision's registry
        processor.tokenizer, processor.video_processor = self.tokenizer, vp
        processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
        processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        grid = torch.tensor(grids)
        inputs = {"video_grid_thw": grid, "video_metadata": metas}
        placeholders = [processor.replace_video_token(inputs, i) for i in range(len(videos))]
        text = processor.get_text_with_replacements([text], videos_replacements=placeholders)[0][0]
        return torch.cat(values), grid, text

    def video_timestamps(self, raw: bytes) -> list[float]:
        """The seconds transformers' processor states for each frame group of a video."""
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        vp = Qwen3VLVideoProcessor.from_pretrained(str(self.path))
        _, meta = decode_all_frames(raw)
        indices = vp.sample_frames(meta)
        return Qwen3VLProcessor._calculate_timestamps(None, indices, meta.fps, vp.temporal_patch_size)

    @torch.inference_mode()
    def generate(self, prompt: str, images: list[bytes], max_new_tokens: int, min_new_tokens: int = 0,
                 videos: list[bytes] = ()) -> list[int]:
        """Greedy ids; a generation that stopped ends with the end token. `min_new_tokens`: no end
        token before that many (transformers' min_new_tokens, TensorRT-LLM's min_tokens)."""
        return self._generate(self.inputs(prompt, images, videos), max_new_tokens, min_new_tokens)

    def generate_messages(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Greedy ids for OpenAI chat messages (images as base64 data URLs in image_url parts)."""
        return self._generate(self.conversation_inputs(*openai_to_template(messages)), max_new_tokens)

    @torch.inference_mode()
    def _generate(self, inp: OracleInputs, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
        extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
        out = self.model.generate(**inp.kwargs(), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=self.end_ids, pad_token_id=self.end_id, **extra)
        return out[0, inp.input_ids.shape[1]:].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def assert_served(self, served: str, ids: list[int]) -> None:
        """Text served by the ensemble for generated `ids` equals their decode.

        One difference is allowed: the ensemble's postprocessing cannot see that a stream was cut
        by max_tokens, so an unfinished character at the very end of such a stream (which
        decode renders as U+FFFD) is not sent."""
        expected = self.text(ids)
        if served == expected:
            return
        cut_by_length = not ids or ids[-1] not in self.end_ids
        assert cut_by_length and served + "\ufffd" == expected, (served, expected)

    @torch.inference_mode()
    def prefill_logits(self, prompt: str, images: list[bytes]) -> torch.Tensor:
        inp = self.inputs(prompt, images)
        return self.model(**inp.kwargs()).logits[0]


def openai_to_template(messages: list[dict]) -> tuple[list[dict], list[bytes], list[bytes]]:
    """OpenAI chat messages -> the chat template's conversation and the decoded images and videos,
    in order."""
    import base64

    conversation, images, videos = [], [], []
    for m in messages:
        if isinstance(m["content"], str):
            conversation.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "video_url":
                videos.append(base64.b64decode(part["video_url"]["url"].split(",", 1)[-1]))
                parts.append({"type": "video"})
            else:
                images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[-1]))
                parts.append({"type": "image"})
        conversation.append({"role": m["role"], "content": parts})
    return conversation, images, videos


def data_url(image: bytes, kind: str = "png") -> str:
    import base64

    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic noisy test image with some structure, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width, 1)), (y * 255 // max(height, 1)), ((x + y) * 3) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def decode_all_frames(raw: bytes):
    """Every frame of an encoded video (RGB, `[n, H, W, 3]` uint8) decoded with PyAV, and transformers'
    VideoMetadata from what the container declares (as its PyAV reader states it)."""
    import av
    from transformers.video_utils import VideoMetadata

    with av.open(io.BytesIO(raw)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        meta = VideoMetadata(total_num_frames=int(stream.frames), fps=fps, duration=stream.frames / fps,
                             width=stream.width, height=stream.height, video_backend="pyav")
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, meta


def video_data_url(video: bytes, kind: str = "mp4") -> str:
    import base64

    return f"data:video/{kind};base64," + base64.b64encode(video).decode()
