"""A request to `qwen3vl` (docs/design.md §4) and its responses, as one type each: every client builds the
request here (the client library over gRPC and HTTP, the OpenAI endpoint, the disaggregated sender
and `qwen3vl_disagg` for the `encode` ensemble, which takes the same inputs), and reads the
responses here.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

MODEL = "qwen3vl"
ENCODE_MODEL = "encode"  # the encoder server's ensemble: the same prompt inputs, the table out
# the inputs `encode` takes: the prompt, its images and videos, and max_tokens (checked there)
ENCODE_INPUTS = ("text_input", "messages", "image", "video", "max_tokens")
SAMPLING = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "seed": np.uint64}
INPUTS = (*ENCODE_INPUTS, *SAMPLING, "stream", "stop_words")


def _bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def image_b64(data: bytes | str) -> str:
    """An image or video for a JSON body: bytes are base64-encoded; a str (base64 or data URL) is sent as is."""
    return data if isinstance(data, str) else base64.b64encode(data).decode("ascii")


@dataclass
class Qwen3VLRequest:
    """One request: a prompt with images and videos (encoded files), or OpenAI chat `messages` (a
    list, or its JSON text); optional sampling, streaming and stop strings. A str or bytes prompt is
    sent as it is."""

    prompt: str | bytes | None = None
    images: Sequence[bytes | str] = ()
    max_tokens: int = 128
    messages: list | str | bytes | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool | None = None
    stop: Sequence[str] = ()
    videos: Sequence[bytes | str] = ()
    conversation_id: str | None = None  # qwen3vl_disagg only: keeps a conversation on one language server

    def _prompt(self) -> dict[str, bytes]:
        """`text_input` and/or `messages` (the server refuses both, or neither, by name)."""
        out = {}
        if self.prompt is not None:
            out["text_input"] = _bytes(self.prompt)
        if self.messages is not None:
            text = self.messages if isinstance(self.messages, (str, bytes)) else json.dumps(self.messages)
            out["messages"] = _bytes(text)
        return out

    def arrays(self, encode_only: bool = False) -> dict[str, np.ndarray]:
        """The inputs (batch dimension 1); `encode_only`: those the `encode` ensemble takes."""
        out = {name: np.array([[value]], dtype=np.object_) for name, value in self._prompt().items()}
        out["max_tokens"] = np.array([[self.max_tokens]], np.int32)
        if self.images:
            out["image"] = np.array([[_bytes(i) for i in self.images]], dtype=np.object_)
        if self.videos:
            out["video"] = np.array([[_bytes(v) for v in self.videos]], dtype=np.object_)
        if encode_only:
            return out
        if self.stream is not None:
            out["stream"] = np.array([[self.stream]], dtype=bool)
        for key, dtype in SAMPLING.items():
            if getattr(self, key) is not None:
                out[key] = np.array([[getattr(self, key)]], dtype=dtype)
        if self.stop:
            out["stop_words"] = np.array([[_bytes(s) for s in self.stop]], dtype=np.object_)
        if self.conversation_id is not None:
            out["conversation_id"] = np.array([[_bytes(self.conversation_id)]], dtype=np.object_)
        return out

    def grpc_inputs(self, encode_only: bool = False) -> list:
        """tritonclient gRPC inputs."""
        from qwen3vl_triton.clients.grpc_stream import infer_input

        return [infer_input(name, value) for name, value in self.arrays(encode_only).items()]

    def json_body(self, request_id: str | None = None) -> dict:
        """The body of Triton's HTTP generate / generate_stream request (images as base64)."""
        body = {name: value.decode("utf-8") for name, value in self._prompt().items()}
        body["max_tokens"] = self.max_tokens
        if request_id is not None:
            body["id"] = request_id
        if self.stream is not None:
            body["stream"] = self.stream
        if self.images:
            body["image"] = [image_b64(i) for i in self.images]
        if self.videos:
            body["video"] = [image_b64(v) for v in self.videos]
        body.update({k: getattr(self, k) for k in SAMPLING if getattr(self, k) is not None})
        if self.stop:
            body["stop_words"] = list(self.stop)
        if self.conversation_id is not None:
            body["conversation_id"] = self.conversation_id
        return body

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray | None]) -> "Qwen3VLRequest":
        """A request from a model's input arrays (values kept as they came: text as bytes)."""
        from qwen3vl_triton.arrays import scalar

        def one(name):
            value = arrays.get(name)
            return None if value is None else value.reshape(-1)[0]

        images, videos = arrays.get("image"), arrays.get("video")
        stops = arrays.get("stop_words")
        return cls(prompt=one("text_input"), messages=one("messages"),
                   images=() if images is None else list(images.reshape(-1)),
                   videos=() if videos is None else list(videos.reshape(-1)),
                   max_tokens=scalar(arrays, "max_tokens", int, required=True),
                   stream=scalar(arrays, "stream", bool), stop=() if stops is None else list(stops.reshape(-1)),
                   **{k: scalar(arrays, k, float if v is np.float32 else int) for k, v in SAMPLING.items()})


@dataclass
class Qwen3VLResponse:
    """One response: the new text, and what `qwen3vl` (and `qwen3vl_disagg`) sends beside it (None
    where a response lacks it)."""

    text: str
    output_ids: np.ndarray | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None  # None while the generation goes on
    generation_id: str | None = None  # the tensorrt_llm request's id: a `stop` request names it

    @property
    def tokens(self) -> int:
        return 0 if self.output_ids is None else int(self.output_ids.size)

    @classmethod
    def from_result(cls, result) -> "Qwen3VLResponse | None":
        """From a tritonclient result; None for the empty final response."""
        if not result.get_response().outputs:
            return None

        def one(name):
            value = result.as_numpy(name)
            return None if value is None else value.reshape(-1)[0]

        text = result.as_numpy("text_output")
        finish, gid, prompt = one("finish_reason"), one("generation_id"), one("prompt_tokens")
        return cls(text="" if text is None else "".join(t.decode("utf-8") for t in text.reshape(-1)),
                   output_ids=result.as_numpy("output_ids"),
                   prompt_tokens=None if prompt is None else int(prompt),
                   finish_reason=(finish.decode() or None) if finish is not None else None,
                   generation_id=None if gid is None else gid.decode())

    @classmethod
    def from_event(cls, event: dict) -> "Qwen3VLResponse":
        """From one event of Triton's HTTP generate_stream (JSON)."""
        text = event.get("text_output", "")
        ids = event.get("output_ids")
        return cls(text="".join(text) if isinstance(text, list) else text,
                   output_ids=None if ids is None else np.asarray(ids).reshape(-1),
                   prompt_tokens=event.get("prompt_tokens"), finish_reason=event.get("finish_reason") or None,
                   generation_id=event.get("generation_id"))
