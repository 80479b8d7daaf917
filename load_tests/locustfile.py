"""Locust users for the qwen3vl ensemble: one over HTTP (generate_stream, server-sent events, JSON body
with base64 images) and one over gRPC (tritonclient's bidirectional stream), both through client.api,
and one for the OpenAI-compatible endpoint (`openai` client, streamed /v1/chat/completions): each of
its tasks is a two-turn conversation, the workload's images in the first turn and a follow-up
question in the second (the same images again: the encoder's cache serves them). VideoUser sends
short synthetic MP4 clips over gRPC (`locust ... VideoUser`; request_type "video").

Each request is reported three ways, as separate Locust entries (request_type "HTTP", "gRPC" or
"OpenAI"; an OpenAI conversation's two turns are two requests):
  generate  the whole request (response_length = streamed responses, one per generated token)
  ttft      time to the first text
  itl       one entry per gap between consecutive text pieces (inter-token latency)

    locust -f load_tests/locustfile.py --headless -u 4 -r 4 --run-time 20s --stop-timeout 10s \
        --http-url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001 --checkpoint checkpoints/tiny

`python -m load_tests.run` (make load-test) wraps this: it starts a server when none is given, bounds
the run, writes the reports and prints a summary.

gRPC under gevent: Locust monkey-patches the standard library, so gRPC's own threads must be made
cooperative with grpc.experimental.gevent.init_gevent() before any channel exists, or the first
streaming call blocks the event loop. The catch is the exit: a tritonclient InferenceServerClient left
open is closed by its __del__ at interpreter shutdown, when the gevent hub no longer runs, and
grpc's Channel.close() then waits forever (the locust process never exits). So every client is closed
while the hub still runs: in User.on_stop, and for any left over, in the `quit` event.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
import locust  # noqa: F401 -- monkey-patches the standard library first (it is already imported under locust)

grpc_gevent.init_gevent()  # after gevent's patching, before any gRPC object exists

import gevent  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the `client` and `load_tests` packages of this checkout

from client.api import Client, GenerationStats  # noqa: E402
from load_tests.workload import Workload, make_video, pixel_limits  # noqa: E402

_WORKLOAD: Workload | None = None
_VIDEOS: list[bytes] = []  # short synthetic MP4s (VideoUser), written once per run
_CLIENTS: list[Client] = []  # every client a user opened, closed at the latest on `quit`
_USER_INDEX = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--http-url", env_var="QWEN3VL_HTTP_URL", default="127.0.0.1:8000",
                        help="HOST:PORT of the server's HTTP endpoint")
    parser.add_argument("--grpc-url", env_var="QWEN3VL_GRPC_URL", default="127.0.0.1:8001",
                        help="HOST:PORT of the server's gRPC endpoint")
    parser.add_argument("--openai-url", env_var="QWEN3VL_OPENAI_URL", default="127.0.0.1:9000",
                        help="HOST:PORT of the OpenAI-compatible endpoint (OpenAIChatUser)")
    parser.add_argument("--model", env_var="QWEN3VL_MODEL", default="qwen3vl",
                        help="model to load: qwen3vl (single server) or qwen3vl_disagg (encoder host)")
    parser.add_argument("--checkpoint", env_var="QWEN3VL_CHECKPOINT", default=str(ROOT / "checkpoints" / "tiny"),
                        help="checkpoint whose preprocessor_config.json gives the image pixel limit")
    parser.add_argument("--max-pixels", type=int, env_var="QWEN3VL_MAX_PIXELS", default=0,
                        help="largest image in pixels (default: max_pixels of --checkpoint)")
    parser.add_argument("--max-tokens", type=int, env_var="QWEN3VL_MAX_TOKENS", default=32,
                        help="max_tokens of every request")
    parser.add_argument("--image-sizes", type=int, env_var="QWEN3VL_IMAGE_SIZES", default=4,
                        help="distinct image sizes, from small to the pixel limit")
    parser.add_argument("--workload-seed", type=int, env_var="QWEN3VL_SEED", default=0,
                        help="seed of the images and of each user's request mix")
    parser.add_argument("--video-seconds", type=float, env_var="QWEN3VL_VIDEO_SECONDS", default=2.0,
                        help="length of VideoUser's clips (three clips, 0.5x, 1x and 1.5x this)")
    parser.add_argument("--request-timeout", type=float, env_var="QWEN3VL_REQUEST_TIMEOUT", default=300.0,
                        help="seconds a request may wait for its next response")


@events.init.add_listener
def _build_workload(environment, **_kw):
    global _WORKLOAD
    opts = environment.parsed_options
    if opts is None:  # used as a library (no command line): the caller builds the workload
        return
    if opts.max_pixels:
        min_pixels, max_pixels = None, opts.max_pixels
    else:
        min_pixels, max_pixels = pixel_limits(opts.checkpoint)
    _WORKLOAD = Workload.build(max_pixels, min_pixels, seed=opts.workload_seed, max_tokens=opts.max_tokens,
                               sizes=opts.image_sizes)
    if any(u.__name__ == "VideoUser" for u in environment.user_classes):
        _VIDEOS[:] = [make_video(seconds=opts.video_seconds * k, seed=opts.workload_seed + i)
                      for i, k in enumerate((0.5, 1.0, 1.5))]


@events.quit.add_listener
def _at_quit(**_kw):
    # Close what on_stop did not (a user that never stopped cleanly) while the gevent hub still runs.
    while _CLIENTS:
        _CLIENTS.pop().close()
    # Locust's CSV writer rewrites <prefix>_stats.csv once a second and is not run again at shutdown,
    # so requests that ended in the last second would be missing from the CSV; the stats are final
    # now, so give the writer one more turn.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


class _GenerateUser(User):
    abstract = True
    protocol = "grpc"
    request_type = "gRPC"
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one ends

    def on_start(self):
        opts = self.environment.parsed_options
        url = opts.grpc_url if self.protocol == "grpc" else opts.http_url
        self.client = Client(url, self.protocol, model=opts.model, timeout=opts.request_timeout)
        _CLIENTS.append(self.client)
        self.rng = random.Random(opts.workload_seed * 100_003 + next(_USER_INDEX))

    def on_stop(self):
        self.client.close()
        if self.client in _CLIENTS:
            _CLIENTS.remove(self.client)

    def _fire(self, name: str, ms: float, length: int = 0, exception=None, context=None) -> None:
        self.environment.events.request.fire(request_type=self.request_type, name=name, response_time=ms,
                                             response_length=length, exception=exception, context=context or {})

    def request(self, stats: GenerationStats):
        """(the streamed pieces of one request, the context its report entries carry)."""
        case = _WORKLOAD.pick(self.rng)
        return self.client.generate(case.prompt, list(case.images), case.max_tokens, stats=stats), {"case": case.label}

    @task
    def generate(self):
        stats = GenerationStats()
        responses = 0
        error = None
        context = {}
        try:
            pieces, context = self.request(stats)
            for _piece in pieces:
                responses += 1
        except Exception as exc:  # noqa: BLE001 -- every failure is a failed request in the report
            error = exc
            stats.end = time.perf_counter()
        self._fire("generate", stats.total * 1000, responses, error, context)
        if error is not None:
            return
        if stats.ttft is None:  # the model ended at once (end-of-turn first): no text, nothing to time
            return
        self._fire("ttft", stats.ttft * 1000, context=context)
        for gap in stats.inter_token:
            self._fire("itl", gap * 1000)


class HttpGenerateUser(_GenerateUser):
    protocol = "http"
    request_type = "HTTP"


class GrpcGenerateUser(_GenerateUser):
    protocol = "grpc"
    request_type = "gRPC"


class VideoUser(GrpcGenerateUser):
    """Short videos (MP4, 160x120, 30 fps; 1, 2 and 3 s by default) with a question, over gRPC:
    request_type "video"."""

    request_type = "video"

    def request(self, stats: GenerationStats):
        video = self.rng.choice(_VIDEOS)
        max_tokens = self.environment.parsed_options.max_tokens
        return (self.client.generate("What happens in this video?", [], max_tokens, stats=stats, videos=[video]),
                {"bytes": len(video)})


class OpenAIChatUser(User):
    """Two-turn conversations through /v1/chat/completions, streamed, with the official client."""

    request_type = "OpenAI"
    wait_time = constant(0)

    def on_start(self):
        import openai

        opts = self.environment.parsed_options
        self.client = openai.OpenAI(base_url=f"http://{opts.openai_url}/v1", api_key="none", max_retries=0,
                                    timeout=opts.request_timeout)
        self.rng = random.Random(opts.workload_seed * 100_003 + next(_USER_INDEX))

    def on_stop(self):
        self.client.close()

    def _fire(self, name: str, ms: float, length: int = 0, exception=None, context=None) -> None:
        self.environment.events.request.fire(request_type=self.request_type, name=name, response_time=ms,
                                             response_length=length, exception=exception, context=context or {})

    def _turn(self, messages, max_tokens: int, label: str) -> str | None:
        stats, parts, chunks, error = GenerationStats(), [], 0, None
        try:
            for chunk in self.client.chat.completions.create(model="qwen3vl", messages=messages,
                                                             max_tokens=max_tokens, stream=True):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    chunks += 1
                    stats.mark(piece)
                    parts.append(piece)
        except Exception as exc:  # noqa: BLE001 -- every failure is a failed request in the report
            error = exc
        stats.end = time.perf_counter()
        self._fire("generate", stats.total * 1000, chunks, error, {"case": label})
        if error is not None:
            return None
        if stats.ttft is not None:
            self._fire("ttft", stats.ttft * 1000, context={"case": label})
            for gap in stats.inter_token:
                self._fire("itl", gap * 1000)
        return "".join(parts)

    @task
    def conversation(self):
        from client import Conversation

        case = _WORKLOAD.pick(self.rng)
        conv = Conversation(system="You are a helpful assistant.").user(case.prompt, list(case.images))
        answer = self._turn(conv.messages, case.max_tokens, case.label)
        if answer is None:
            return
        conv.assistant(answer).user("Tell me one more thing about it.")
        self._turn(conv.messages, case.max_tokens, f"{case.label}, turn 2")
