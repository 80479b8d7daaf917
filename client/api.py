"""The client library: one `Client` over tritonclient (gRPC) or the HTTP generate extension."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.clients.grpc_stream import message_of

MODEL = "qwen3vl"


class ClientError(RuntimeError):
    """A request failed; the message is the server's (it names the bad input) or says why."""


@dataclass
class GenerationStats:
    """Timings of one generation, measured at the client."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    times: list[float] = field(default_factory=list)  # arrival of each non-empty piece
    pieces: int = 0
    end: float | None = None

    def mark(self, text: str) -> None:
        now = time.perf_counter()
        if text:
            if self.first is None:
                self.first = now
            self.times.append(now)
            self.pieces += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def inter_token(self) -> list[float]:
        return list(np.diff(self.times)) if len(self.times) > 1 else []

    @property
    def total(self) -> float:
        return (self.end or time.perf_counter()) - self.start


def encode_image_b64(data: bytes | str) -> str:
    """An image for a JSON body: bytes are base64-encoded; a str (base64 or data URL) is sent as is."""
    return data if isinstance(data, str) else base64.b64encode(data).decode("ascii")


class Client:
    """`url` is HOST:PORT of the server's gRPC or HTTP endpoint, per `protocol`."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = MODEL, timeout: float = 600.0):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout
        self._grpc = None
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._grpc = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()
            self._grpc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- health ------------------------------------------------------------------------------
    def check_ready(self) -> None:
        """Raise ClientError with a clear message if the server is down or the model not ready."""
        try:
            if self.protocol == "grpc":
                live = self._grpc.is_server_live()
                ready = live and self._grpc.is_model_ready(self.model)
            else:
                import requests

                live = requests.get(f"http://{self.url}/v2/health/live", timeout=5).status_code == 200
                ready = live and requests.get(f"http://{self.url}/v2/models/{self.model}/ready",
                                              timeout=5).status_code == 200
        except Exception as exc:
            raise ClientError(f"cannot reach the server at {self.url} ({self.protocol}): {message_of(exc)}") from None
        if not live:
            raise ClientError(f"the server at {self.url} is not live")
        if not ready:
            raise ClientError(f"model {self.model!r} is not ready on {self.url}")

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompt: str | None, images: list[bytes | str] = (), max_tokens: int = 128, *,
                 stream: bool = True, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, request_id: str | None = None,
                 stats: GenerationStats | None = None, messages: list[dict] | None = None) -> Iterator[str]:
        """Yield the text as it is generated (one piece per response; one piece if not `stream`).

        `messages` (OpenAI chat messages, see `Conversation`) replaces `prompt` and `images`."""
        request_id = request_id or uuid.uuid4().hex
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        if (prompt is None) == (messages is None):
            raise ValueError("give a prompt or messages, not both")
        first = ("messages", json.dumps(messages)) if messages is not None else ("text_input", prompt)
        pieces = (self._grpc_generate if self.protocol == "grpc" else self._http_generate)(
            first, list(images), max_tokens, stream, sampling, request_id)
        for piece in pieces:
            if stats is not None:
                stats.mark(piece)
            yield piece
        if stats is not None:
            stats.end = time.perf_counter()

    def generate_text(self, prompt: str | None, images: list[bytes] = (), max_tokens: int = 128, **kw) -> str:
        return "".join(self.generate(prompt, images, max_tokens, **kw))

    def chat(self, messages: list[dict], max_tokens: int = 128, **kw) -> Iterator[str]:
        """Stream the assistant's reply to a conversation (OpenAI chat messages)."""
        return self.generate(None, (), max_tokens, messages=messages, **kw)

    def _grpc_inputs(self, first, images, max_tokens, stream, sampling):
        import tritonclient.grpc as grpcclient

        def tensor(name, array, dtype):
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            return t

        inputs = [
            tensor(first[0], np.array([[first[1].encode("utf-8")]], dtype=np.object_), "BYTES"),
            tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
            tensor("stream", np.array([[stream]], dtype=bool), "BOOL"),
        ]
        if images:
            raw = [i.encode() if isinstance(i, str) else i for i in images]
            inputs.append(tensor("image", np.array([raw], dtype=np.object_), "BYTES"))
        kinds = {"temperature": (np.float32, "FP32"), "top_k": (np.int32, "INT32"),
                 "top_p": (np.float32, "FP32"), "seed": (np.uint64, "UINT64")}
        for name, value in sampling.items():
            if value is not None:
                dtype, triton = kinds[name]
                inputs.append(tensor(name, np.array([[value]], dtype=dtype), triton))
        return inputs

    def _grpc_generate(self, first, images, max_tokens, stream, sampling, request_id) -> Iterator[str]:
        from qwen3vl_triton.clients.grpc_stream import GrpcStream, StreamError

        channel = GrpcStream(self._grpc, self.timeout, stream_timeout=self.timeout)
        generation, finished = None, False
        try:
            for result in channel.request(self.model, self._grpc_inputs(first, images, max_tokens, stream, sampling),
                                          request_id=request_id):
                if result.get_response().outputs:
                    generation = generation or llm_client.generation_id(result)
                    yield "".join(t.decode("utf-8") for t in result.as_numpy("text_output").reshape(-1))
            finished = True
        except StreamError as exc:
            finished = True
            raise ClientError(str(exc)) from None
        finally:
            if not finished and generation is not None:
                # first: closing the stream waits for the request's end
                llm_client.stop_left(self.url, generation, self.protocol)
            channel.close(cancel=not finished)  # a request left unfinished is cancelled, not waited for

    def _http_body(self, first, images, max_tokens, stream, sampling, request_id) -> dict:
        body = {"id": request_id, first[0]: first[1], "max_tokens": max_tokens, "stream": stream}
        if images:
            body["image"] = [encode_image_b64(i) for i in images]
        body.update({k: v for k, v in sampling.items() if v is not None})
        return body

    def _http_generate(self, first, images, max_tokens, stream, sampling, request_id) -> Iterator[str]:
        import requests

        body = self._http_body(first, images, max_tokens, stream, sampling, request_id)
        try:
            resp = requests.post(f"http://{self.url}/v2/models/{self.model}/generate_stream", json=body,
                                 stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ClientError(f"cannot reach the server at {self.url} (http): {message_of(exc)}") from None
        generation, finished = None, False
        with resp:
            if resp.status_code != 200:
                raise ClientError(_http_error(resp.text))
            try:
                for line in resp.iter_lines(decode_unicode=False):
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        finished = True
                        raise ClientError(event["error"])
                    generation = generation or event.get("generation_id")
                    text = event.get("text_output", "")
                    yield "".join(text) if isinstance(text, list) else text
                finished = True
            finally:
                if not finished and generation:
                    llm_client.stop_left(self.url, generation, self.protocol)


class Conversation:
    """A conversation as OpenAI chat messages, kept across turns:

        conv = Conversation(system="You are brief.")
        conv.user("What is this?", images=[png_bytes])
        reply = "".join(client.chat(conv.messages, max_tokens=64))
        conv.assistant(reply)
        conv.user("And its colour?")   # the next turn sees the whole conversation
    """

    def __init__(self, messages: list[dict] | None = None, system: str | None = None):
        self.messages = list(messages or [])
        if system is not None:
            self.messages.append({"role": "system", "content": system})

    def user(self, text: str, images: list[bytes | str] = ()) -> "Conversation":
        parts = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
        self.messages.append({"role": "user", "content": parts + [{"type": "text", "text": text}]})
        return self

    def assistant(self, text: str) -> "Conversation":
        self.messages.append({"role": "assistant", "content": text})
        return self


def _data_url(image: bytes | str) -> str:
    """A data URL (or the string given: a data URL or base64 already)."""
    if isinstance(image, str):
        return image
    kind = "jpeg" if image[:3] == b"\xff\xd8\xff" else "webp" if image[8:12] == b"WEBP" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode("ascii")


def _http_error(text: str) -> str:
    body = text.strip()
    body = body[5:] if body.startswith("data:") else body  # generate_stream answers errors as an event
    try:
        return json.loads(body).get("error", body)
    except ValueError:
        return body
