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


@dataclass
class OracleInputs:
    input_ids: torch.Tensor  # (1, L) with image_token_id placeholders
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor

    def kwargs(self) -> dict:
        kw = dict(input_ids=self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                  mm_token_type_ids=self.mm_token_type_ids)
        if self.pixel_values is not None:
            kw.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return kw


class Oracle:
    def __init__(self, path):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen3VLMoeForConditionalGeneration

        self.config = AutoConfig.from_pretrained(str(path))
        self.model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        self.end_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token)
        # generation ends at the end of turn and at every eos id of generation_config.json
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.end_ids = list(dict.fromkeys([self.end_id, *eos]))

    def inputs(self, prompt: str, images: list[bytes]) -> OracleInputs:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        return self.conversation_inputs([{"role": "user", "content": content}], images)

    def conversation_inputs(self, conversation: list[dict], images: list[bytes]) -> OracleInputs:
        """A conversation whose images are {"type": "image"} items, `images` in their order."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
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
        mm = (ids == self.config.image_token_id).int()
        return OracleInputs(ids, pixel_values, grid, mm)

    @torch.inference_mode()
    def generate(self, prompt: str, images: list[bytes], max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
        """Greedy ids; a generation that stopped ends with the end token. `min_new_tokens`: no end
        token before that many (transformers' min_new_tokens, TensorRT-LLM's min_tokens)."""
        return self._generate(self.inputs(prompt, images), max_new_tokens, min_new_tokens)

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


def openai_to_template(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """OpenAI chat messages -> the chat template's conversation and the decoded images, in order."""
    import base64

    conversation, images = [], []
    for m in messages:
        if isinstance(m["content"], str):
            conversation.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[-1]))
                parts.append({"type": "image"})
        conversation.append({"role": m["role"], "content": parts})
    return conversation, images


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
