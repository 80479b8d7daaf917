"""The client library: one `Client` over tritonclient (gRPC) or the HTTP generate extension."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qwen3vl_triton.clients.llm import LLMConnection, stop_http, stop_left
from qwen3vl_triton.clients.qwen3vl import MODEL, Qwen3VLRequest, Qwen3VLResponse, image_b64
from qwen3vl_triton.errors import Code, RemoteError, message_of


class ClientError(RemoteError):
    """A request failed; the message is the server's (it names the bad input) or says why. `error`:
    the message as parsed (errors.parse): its code (invalid_arg, unavailable, internal, cancelled)
    and the input it names."""


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


encode_image_b64 = image_b64


class Client:
    """`url` is HOST:PORT of the server's gRPC or HTTP endpoint, per `protocol`; several
    (comma-separated: servers of one pool, e.g. encoder servers) make `generate` retry a request
    that fails UNAVAILABLE (the server is down, stopping or full) on the next one, but only before
    its first piece of text: a stream that has begun is never replayed."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = MODEL, timeout: float = 600.0):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError(f"url: expected HOST:PORT[,HOST:PORT...], got {url!r}")
        self.protocol, self.model, self.timeout = protocol, model, timeout
        self._grpc = self._llm = self._http = None
        self._next = 0  # the server the next request tries first
        self._use(self.urls[0])

    def _use(self, url: str) -> None:
        """Talk to `url` from now on (its own channel)."""
        if getattr(self, "url", None) == url:
            return
        self.close()
        self.url = url
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._grpc = grpcclient.InferenceServerClient(url)  # one channel for every request
            self._llm = LLMConnection(self._grpc)  # stops of left generations, over the same channel
        else:
            import requests

            self._http = requests.Session()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        if self._grpc is not None:
            self._grpc.close()
            self._grpc = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def _stop_left(self, generation: str) -> None:
        """End the generation of a stream this client left (see clients.llm.stop_left)."""
        if self._llm is not None:
            stop_left(self._llm.stop, generation)
        else:
            stop_left(lambda g: stop_http(self._http, self.url, g), generation)

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
                live = self._http.get(f"http://{self.url}/v2/health/live", timeout=5).status_code == 200
                ready = live and self._http.get(f"http://{self.url}/v2/models/{self.model}/ready",
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
                 stats: GenerationStats | None = None, messages: list[dict] | None = None,
                 videos: list[bytes | str] = ()) -> Iterator[str]:
        """Yield the text as it is generated (one piece per response; one piece if not `stream`).

        `videos`: encoded video files (MP4, ...), after the images in the prompt. `messages` (OpenAI
        chat messages, see `Conversation`) replaces `prompt`, `images` and `videos`."""
        request_id = request_id or uuid.uuid4().hex
        if (prompt is None) == (messages is None):
            raise ValueError("give a prompt or messages, not both")
        request = Qwen3VLRequest(prompt, list(images), max_tokens, messages=messages, stream=stream,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, videos=list(videos))
        for attempt in range(len(self.urls)):
            if len(self.urls) > 1:
                self._use(self.urls[(self._next + attempt) % len(self.urls)])
            pieces = (self._grpc_generate if self.protocol == "grpc" else self._http_generate)(request, request_id)
            begun = False
            try:
                for piece in pieces:
                    begun = True
                    if stats is not None:
                        stats.mark(piece)
                    yield piece
                break
            except ClientError as exc:
                if begun or attempt == len(self.urls) - 1 or exc.error.code is not Code.UNAVAILABLE:
                    raise
            finally:  # a caller that leaves stops the generation now, while this client's connections are open
                pieces.close()
        self._next = (self._next + 1) % len(self.urls)
        if stats is not None:
            stats.end = time.perf_counter()

    def generate_text(self, prompt: str | None, images: list[bytes] = (), max_tokens: int = 128, **kw) -> str:
        return "".join(self.generate(prompt, images, max_tokens, **kw))

    def chat(self, messages: list[dict], max_tokens: int = 128, **kw) -> Iterator[str]:
        """Stream the assistant's reply to a conversation (OpenAI chat messages)."""
        return self.generate(None, (), max_tokens, messages=messages, **kw)

    def _grpc_generate(self, request: Qwen3VLRequest, request_id: str) -> Iterator[str]:
        from qwen3vl_triton.clients.grpc_stream import GrpcStream, StreamError

        channel = GrpcStream(self._grpc, self.timeout, stream_timeout=self.timeout)  # a stream on the channel
        generation, finished = None, False
        try:
            for result in channel.request(self.model, request.grpc_inputs(), request_id=request_id):
                response = Qwen3VLResponse.from_result(result)
                if response is not None:
                    generation = generation or response.generation_id
                    yield response.text
            finished = True
        except StreamError as exc:
            finished = True
            # a stream that broke (server gone, stopping): UNAVAILABLE, which a retry may get past
            if exc.broken:
                raise ClientError(f"the server at {self.url} is unavailable: {exc}", "UNAVAILABLE") from None
            raise ClientError(str(exc), exc.error.code.name) from None
        finally:
            if not finished and generation is not None:
                self._stop_left(generation)  # first: closing the stream waits for the request's end
            channel.close(cancel=not finished)  # a request left unfinished is cancelled, not waited for

    def _http_generate(self, request: Qwen3VLRequest, request_id: str) -> Iterator[str]:
        import requests

        try:
            resp = self._http.post(f"http://{self.url}/v2/models/{self.model}/generate_stream",
                                   json=request.json_body(request_id), stream=True, timeout=self.timeout)
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
                    response = Qwen3VLResponse.from_event(event)
                    generation = generation or response.generation_id
                    yield response.text
                finished = True
            finally:
                if not finished and generation:
                    self._stop_left(generation)


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

    def user(self, text: str, images: list[bytes | str] = (), videos: list[bytes | str] = ()) -> "Conversation":
        parts = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
        parts += [{"type": "video_url", "video_url": {"url": video_data_url(v)}} for v in videos]
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


def video_data_url(video: bytes | str) -> str:
    """A video as a data URL (or the string given: a data URL or base64 already)."""
    if isinstance(video, str):
        return video
    kind = ("webm" if video[:4] == b"\x1a\x45\xdf\xa3" else "quicktime" if video[4:12] == b"ftypqt  "
            else "mp4")
    return f"data:video/{kind};base64," + base64.b64encode(video).decode("ascii")


def _http_error(text: str) -> str:
    body = text.strip()
    body = body[5:] if body.startswith("data:") else body  # generate_stream answers errors as an event
    try:
        return json.loads(body).get("error", body)
    except ValueError:
        return body
