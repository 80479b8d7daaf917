"""An OpenAI-compatible HTTP endpoint in front of the `qwen3vl` model: `GET /v1/models` and
`POST /v1/chat/completions` (streamed as server-sent events or not).

It is a client of Triton (tritonclient's asyncio gRPC stream), never a second copy of the model:
the conversation goes to `qwen3vl` as its `messages` input, and the answer comes back with the
token ids, prompt length and finish reason the model sends beside the text. A client that goes
away mid-stream cancels its request (Triton cancels the generation). Remote image URLs are
fetched only from hosts the operator allowed, within a size and a time limit; every other image
must come as a data URL or base64.

    python -m qwen3vl_triton.api.openai_server --grpc-url 127.0.0.1:8001 --port 9000

(`qwen3vl-serve --openai-port 9000` starts it beside tritonserver.)
"""


import argparse
import asyncio
import base64
import contextlib
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

from qwen3vl_triton.api.http_limits import BodyLimit, BodyTooLarge, HTTPLimits, guarded_protocol
from qwen3vl_triton.clients.llm import LLMConnection, stop_left
from qwen3vl_triton.clients.qwen3vl import MODEL, Qwen3VLRequest, Qwen3VLResponse
from qwen3vl_triton.errors import Code, InputError, parse
from qwen3vl_triton.text import preprocess, untrusted
from qwen3vl_triton.text.video import VideoLimits

# Request fields this server does not implement, each with the values that ask for nothing (those
# are accepted, as clients send them by default); any other value is a 400 naming the field rather
# than an answer that silently ignores it.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,),
}


class APIError(Exception):
    """An OpenAI error object: HTTP status, message, the request field it names (param)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("server_error" if status >= 500 and status != 503 else
                             {404: "not_found_error", 503: "service_unavailable"}.get(status, "invalid_request_error"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": "model_not_found" if self.status == 404 and self.param == "model" else None}}


@dataclass
class ImagePolicy:
    """Which remote image URLs are fetched: http(s) on `hosts` only, at most `max_bytes` each,
    within `timeout` seconds; redirects are not followed."""

    hosts: frozenset = field(default_factory=frozenset)
    max_bytes: int = 20 * 2**20
    timeout: float = 5.0

    @classmethod
    def parse(cls, hosts: str, max_bytes: int, timeout: float) -> "ImagePolicy":
        return cls(frozenset(h.strip().lower() for h in hosts.split(",") if h.strip()), max_bytes, timeout)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect could lead off the allowed hosts


def fetch_image(url: str, policy: ImagePolicy, param: str) -> str:
    """The image at an allowed remote URL, as a data URL."""
    try:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
    except ValueError as exc:  # e.g. "http://[::1": not a URL
        raise APIError(400, f"{param}: is not a valid URL ({exc})", param) from None
    if host not in policy.hosts:
        raise APIError(400, f"{param}: remote image URLs are not fetched from {host or 'this URL'!r}: send the "
                            "image as a data URL or base64" + ("" if not policy.hosts else
                                                               f" (allowed hosts: {', '.join(sorted(policy.hosts))})"),
                       param)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "qwen3vl-triton"}),
                         timeout=policy.timeout) as resp:
            data = resp.read(policy.max_bytes + 1)
            kind = resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        raise APIError(400, f"{param}: fetching the image failed: HTTP {exc.code}", param) from None
    except Exception as exc:  # noqa: BLE001 -- network failure or timeout: the client's URL
        raise APIError(400, f"{param}: fetching the image failed: {type(exc).__name__}: {exc}", param) from None
    if len(data) > policy.max_bytes:
        raise APIError(400, f"{param}: the image is larger than the limit of {policy.max_bytes} bytes", param)
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


async def resolve_images(messages, policy: ImagePolicy) -> list:
    """Replace allowed remote image URLs by data URLs (refuse the others); anything else is
    checked by the model."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            value = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
            url = value.get("url") if isinstance(value, dict) else value
            if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
                param = f"messages[{i}].content[{j}].image_url"
                data = await asyncio.to_thread(fetch_image, url, policy, param)
                part = {**part, "image_url": {**(value if isinstance(value, dict) else {}), "url": data}}
            parts.append(part)
        out.append({**msg, "content": parts})
    return out


@dataclass
class Params:
    """A chat-completion request, checked field by field."""

    messages: list
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    user: str | None = None  # the end user: qwen3vl_disagg keeps one user's turns on one language server

    @classmethod
    def parse(cls, body, model: str, max_output_len: int) -> "Params":
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise APIError(400, "model: is required (a string)", "model")
        if body["model"] != model:
            raise APIError(404, f"The model {untrusted.short(body['model'])} does not exist (this server serves "
                                f"'{model}')", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: must be a non-empty array of messages", "messages")
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise APIError(400, f"n: only 1 choice per request is supported, got {untrusted.short(n)}", "n")

        for name, ignored in UNSUPPORTED.items():
            if body.get(name) not in ignored:
                raise APIError(400, f"{name}: not supported by this server (got {untrusted.short(body[name])}); "
                                    f"leave it out", name)

        def number(name, low, high, integer=False, low_open=False):
            value = body.get(name)
            if value is None:
                return None
            kinds = (int,) if integer else (int, float)
            # (math.isfinite of an int converts it to a float, which overflows past 1e308)
            if isinstance(value, bool) or not isinstance(value, kinds) \
                    or (isinstance(value, float) and not math.isfinite(value)) \
                    or value < low or value > high or (low_open and value == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                raise APIError(400, f"{name}: must be {'an integer' if integer else 'a number'} in {bound}, "
                                    f"got {untrusted.short(value)}", name)
            return value

        field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(field_name, 1, max_output_len, integer=True)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str) and stop:
            stop = [stop]
        elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise APIError(400, "stop: must be a string or an array of up to 4 non-empty strings", "stop")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise APIError(400, "stream: must be a boolean", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options: must be an object", "stream_options")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise APIError(400, "user: must be a string", "user")
        return cls(messages=messages, max_tokens=max_tokens or max_output_len, stream=stream,
                   include_usage=bool(options.get("include_usage")), temperature=number("temperature", 0, 2),
                   top_p=number("top_p", 0, 1, low_open=True), seed=number("seed", 0, 2**63 - 1, integer=True),
                   stop=stop, user=user or None)


# the model's inputs that an OpenAI client knows by another name
_PARAMS = {"text_input": "messages", "request_output_len": "max_tokens"}
_STATUS = {Code.INVALID_ARG: 400, Code.UNAVAILABLE: 503, Code.CANCELLED: 503, Code.INTERNAL: 500}


def triton_error(message: str, status: str | None = None) -> APIError:
    """An error from Triton (errors.parse) as the HTTP status it deserves, naming the input it names."""
    error = parse(message, status)
    return APIError(_STATUS[error.code], error.text, _PARAMS.get(error.input, error.input))


class Backend:
    """`qwen3vl` (or `qwen3vl_disagg`, the same interface on an encoder server) over tritonclient's
    asyncio gRPC stream."""

    def __init__(self, url: str, model: str = MODEL):
        import tritonclient.grpc.aio as aio

        self.url, self.model = url, model
        self.client = aio.InferenceServerClient(url)
        # the ensemble's generation is stopped by its id (tensorrt_llm `stop`), from a thread;
        # qwen3vl_disagg, a plain decoupled model, sees the cancelled stream and stops its own
        self.llm = LLMConnection(url) if model == MODEL else None

    def request(self, p: Params) -> Qwen3VLRequest:
        return Qwen3VLRequest(messages=p.messages, max_tokens=p.max_tokens, stream=True, temperature=p.temperature,
                              top_p=p.top_p, seed=p.seed, stop=p.stop,
                              conversation_id=p.user if self.model != MODEL else None)

    async def generate(self, p: Params):
        """Yield (text, token count, prompt tokens, finish reason or None) per response; a stream
        that is closed early (the caller's task cancelled) cancels the request in Triton."""
        import grpc

        request = {"model_name": self.model, "inputs": self.request(p).grpc_inputs(), "request_id": uuid.uuid4().hex,
                   "parameters": None}

        async def one():
            yield request

        stream = self.client.stream_infer(one())
        generation, finished = None, False
        try:
            async for result, error in stream:
                if error is not None:
                    finished = True
                    raise triton_error(error.message(), error.status())
                response = Qwen3VLResponse.from_result(result)
                if response is None:
                    continue
                generation = generation or response.generation_id
                finished = response.finish_reason is not None
                yield response.text, response.tokens, response.prompt_tokens, response.finish_reason
                if finished:
                    return
            finished = True
        except grpc.aio.AioRpcError as exc:
            finished = True
            raise triton_error(f"the model server at {self.url} failed: {exc.details()}", str(exc.code())) from None
        finally:
            stream.cancel()  # a no-op after the final response; otherwise Triton cancels the request
            if not finished and generation is not None and self.llm is not None:
                # Triton 2.51 does not cancel an ensemble step that is already running, so the
                # generation itself is ended by its id (tensorrt_llm's `stop`), off the event loop
                threading.Thread(target=self._stop, args=(generation,), name="stop", daemon=True).start()

    def _stop(self, generation: str) -> None:
        problem = stop_left(self.llm.stop, generation)
        if problem:
            print(f"openai: {problem}", flush=True)

    async def close(self):
        await self.client.close()
        if self.llm is not None:
            self.llm.close()


def error_body(status: int, message: str) -> bytes:
    """An OpenAI error object as a response body, for answers given outside the application's handlers."""
    return json.dumps(APIError(status, message).body()).encode()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(backend: Backend, served_model: str = MODEL, max_output_len: int = 1024,
               images: ImagePolicy | None = None, limits: preprocess.Limits | None = None, max_images: int = 8,
               body_budget: int | None = None):
    """The application. `limits` bound a request as the model bounds it (its body by `request_bytes`,
    before it is read; its text and each image's bytes, with `max_images`, before it is forwarded);
    `body_budget` bounds the bodies of all requests in flight together (http_limits.BodyLimit)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    images = images or ImagePolicy()
    limits = limits or preprocess.Limits()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await backend.close()

    # no interactive docs or schema: the API is OpenAI's, and a closed server publishes nothing else
    app = FastAPI(title="qwen3vl-triton OpenAI-compatible API", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(BodyTooLarge)  # a chunked body, refused at the limit while it was read
    async def _too_large(_request, exc: BodyTooLarge):
        return JSONResponse(APIError(exc.status, exc.message).body(), status_code=exc.status)

    @app.exception_handler(ClientDisconnect)  # the client left (or was closed) while sending its body
    async def _gone(_request, _exc):
        return Response(status_code=499)  # nobody reads it

    # the body's size: from Content-Length before anything is read, else as it is read
    app.add_middleware(BodyLimit, max_bytes=limits.request_bytes, error_body=error_body, budget=body_budget)

    async def read_json(request: Request):
        """The body as client JSON: bounded nesting and numbers, no lone surrogates (text/untrusted.py)."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
        try:
            doc = untrusted.decode(raw, "", "request")
            del raw  # the body is held once at a time: bytes, then text, then values
            return untrusted.loads(doc, "", "request")
        except InputError as exc:
            raise APIError(400, str(exc), None if exc.input == "request" else exc.input) from None

    def check_messages(messages) -> None:
        """What the model would refuse without decoding anything, refused here: no copy of a request
        that will fail is forwarded (the model checks the same again)."""
        try:
            videos, video_names = [], []
            _, found, names = preprocess.parse_messages(messages, limits, videos, video_names)
            preprocess.check_images(found, names, limits, max_images, videos=videos, video_names=video_names)
        except InputError as exc:
            raise APIError(400, str(exc), exc.input) from None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):  # unknown paths, wrong methods
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    model_object = {"id": served_model, "object": "model", "created": created, "owned_by": "qwen3vl-triton"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != served_model:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{served_model}')", "model")
        return model_object

    @app.get("/health")
    async def health():
        try:
            ready = await backend.client.is_model_ready(backend.model)
        except Exception:  # noqa: BLE001 -- the server is not reachable
            ready = False
        if not ready:
            raise APIError(503, f"model {backend.model!r} is not ready on {backend.url}")
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        p = Params.parse(await read_json(request), served_model, max_output_len)
        p.messages = await resolve_images(p.messages, images)
        check_messages(p.messages)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        pieces = backend.generate(p)
        try:
            first = await anext(pieces)  # errors before the first token are HTTP errors
        except StopAsyncIteration:
            raise APIError(500, "the model ended the stream without an answer") from None
        except BaseException:
            await pieces.aclose()
            raise

        if not p.stream:
            async def collect():
                texts, completion, (text, n, prompt, finish) = [], 0, first
                try:
                    while True:
                        texts.append(text)
                        completion += n
                        if finish is not None:
                            return texts, completion, prompt, finish
                        text, n, prompt, finish = await anext(pieces)
                finally:
                    await pieces.aclose()  # also when cancelled: Triton cancels the generation

            async def disconnected():  # the body is read: the next ASGI message is the client leaving
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            # a client that goes away before the whole answer is ready cancels its generation too
            task, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
            try:
                await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not task.done():  # the client left (or this handler was cancelled)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if task.cancelled():
                return Response(status_code=499)  # nobody reads it
            texts, completion, prompt, finish = task.result()
            return {"id": cid, "object": "chat.completion", "created": now, "model": served_model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                                 "logprobs": None, "finish_reason": finish or "length"}],
                    "usage": _usage(prompt, completion)}

        def chunk(delta: dict, finish=None, usage=False) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": served_model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if p.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            completion, prompt, finish = 0, first[2], None
            try:
                yield chunk({"role": "assistant", "content": ""})
                item = first
                while True:
                    text, n, prompt, finish = item
                    completion += n
                    if text:
                        yield chunk({"content": text})
                    if finish is not None:
                        break
                    item = await anext(pieces)
                yield chunk({}, finish)
                if p.include_usage:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": served_model,
                             "choices": [], "usage": _usage(prompt, completion)}
                    yield f"data: {json.dumps(usage)}\n\n"
            except APIError as exc:  # after the 200 was sent: the error goes in the stream
                yield f"data: {json.dumps(exc.body())}\n\n"
            except StopAsyncIteration:
                yield chunk({}, "length")
            finally:
                await pieces.aclose()  # a client that went away: Triton cancels its generation
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def main(argv=None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(
        prog="python -m qwen3vl_triton.api.openai_server", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--grpc-url", default="127.0.0.1:8001", help="HOST:PORT of Triton's gRPC endpoint")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--model", default=MODEL, help="the Triton model to call (qwen3vl)")
    ap.add_argument("--served-model-name", default=MODEL, help="the model name clients send")
    ap.add_argument("--max-output-len", type=int, default=1024, help="the server's largest max_tokens (the default)")
    ap.add_argument("--image-url-hosts", default="", help="comma-separated hosts whose http(s) image URLs are "
                                                          "fetched (default: none)")
    ap.add_argument("--image-url-max-bytes", type=int, default=20 * 2**20)
    ap.add_argument("--image-url-timeout-ms", type=int, default=5000)
    defaults, http = preprocess.Limits(), HTTPLimits()
    ap.add_argument("--max-request-bytes", type=int, default=defaults.request_bytes,
                    help="a request body's bound, refused (413) before it is read")
    ap.add_argument("--body-budget-bytes", type=int, default=4 * defaults.request_bytes,
                    help="the bodies of all requests in flight together; past it 503 before reading")
    ap.add_argument("--max-text-bytes", type=int, default=defaults.text_bytes, help="all text of a request")
    ap.add_argument("--max-image-bytes", type=int, default=defaults.image_bytes, help="each image")
    ap.add_argument("--max-images", type=int, default=8, help="images per request")
    ap.add_argument("--max-video-bytes", type=int, default=defaults.video.bytes, help="each video")
    ap.add_argument("--max-videos", type=int, default=defaults.video.count, help="videos per request")
    ap.add_argument("--header-timeout-ms", type=int, default=int(http.header_timeout * 1e3),
                    help="for a request's line and headers to arrive (then 408 and close)")
    ap.add_argument("--body-timeout-ms", type=int, default=int(http.body_timeout * 1e3),
                    help="for a request's whole body to arrive, from the end of its headers")
    ap.add_argument("--max-connections", type=int, default=http.max_connections,
                    help="open at once; past it a new connection is answered 503 and closed")
    args = ap.parse_args(argv)
    policy = ImagePolicy.parse(args.image_url_hosts, args.image_url_max_bytes, args.image_url_timeout_ms / 1e3)
    limits = preprocess.Limits(text_bytes=args.max_text_bytes, image_bytes=args.max_image_bytes,
                               request_bytes=args.max_request_bytes,
                               video=VideoLimits(count=args.max_videos, bytes=args.max_video_bytes))
    http = HTTPLimits(args.header_timeout_ms / 1e3, args.body_timeout_ms / 1e3, args.max_connections)

    async def serve():
        app = create_app(Backend(args.grpc_url, args.model), args.served_model_name, args.max_output_len, policy,
                         limits, args.max_images, max(args.body_budget_bytes, args.max_request_bytes))
        # h11 (not httptools, which bounds no header size), with the read timeouts and connection bound
        # uvicorn lacks (http_limits.py); no WebSocket upgrades
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on",
                                http=guarded_protocol(http, error_body), ws="none")
        await uvicorn.Server(config).serve()

    asyncio.run(serve())  # the gRPC channel is made inside the server's event loop
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
