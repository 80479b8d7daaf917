"""The bench's workload and the three ways of running it: transformers in process (the
baseline), the `qwen3vl` ensemble over gRPC streaming, and the disaggregated path.

Closed loop: `concurrency` workers each send their requests back to back. Every worker first
sends warm-up requests; all workers then wait at a barrier, and the measured phase runs from the
barrier to the last response, so warm-up never counts.

Exactly `max_tokens` tokens on both sides: the server cannot ignore the end-of-turn token
through `qwen3vl`, so the workload uses prompts and image seeds for which the `small`
checkpoint's greedy generation does not end within 128 tokens (checked when the workload was
chosen), and every run counts the tokens each request really got (`short_requests` in the JSON
says when one stopped early). The baseline calls plain greedy `generate`, not `min_new_tokens`,
so both sides do the same computation and stop by the same rule.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from dataclasses import dataclass

from PIL import Image

from .bench_report import Run, Sample

PROMPTS = [
    "Describe this image in short.",
    "What is in the picture?",
    "Count the circles and squares in the image.",
    "Read the text on the sign.",
]


@dataclass(frozen=True)
class Item:
    """One request of the workload."""

    prompt: str
    image: bytes
    size: tuple[int, int]


def seeded_image(width: int, height: int, seed: int) -> bytes:
    """A deterministic PNG (the test suite's image maker: gradients plus seeded noise)."""
    from tests.oracle import image_bytes

    return image_bytes(width, height, seed=seed)


def workload(size: tuple[int, int], count: int) -> list[Item]:
    """`count` requests on images of `size`: the prompts in turn, image seeds 0, 1, 2, ..."""
    return [Item(PROMPTS[i % len(PROMPTS)], seeded_image(*size, seed=i), size) for i in range(count)]


def warmup_request(size: tuple[int, int]) -> Item:
    """The warm-up request of every run on `size`: an image no measured request sends (seeded
    apart from the workload's 0, 1, 2, ...)."""
    return Item(PROMPTS[0], seeded_image(*size, seed=1_000_000), size)


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def closed_loop(session_factory, items: list[Item], concurrency: int, warmup: int, max_tokens: int,
                warmup_tokens: int, mode: str, log=print, warmup_item: Item | None = None,
                image: str | None = None) -> Run:
    """Run `items` split over `concurrency` workers; each worker opens one session.

    `session_factory()` returns an object with `request(item, max_tokens) -> Sample` and `close()`.
    Each worker warms up with `warmup` requests of `warmup_item` (default: its first item); an
    item that is not measured keeps caches of images or prompts from helping the measured ones.
    `image`: the run's image column (default: the first item's size; items of other kinds, such
    as load_tests.workload's cases, name it)."""
    barrier = threading.Barrier(concurrency + 1)
    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(mine: list[Item]):
        session = None
        try:
            session = session_factory()
            for item in ([warmup_item] if warmup_item is not None else mine[:1]) * warmup:
                session.request(item, warmup_tokens)
        except BaseException as exc:  # noqa: BLE001 -- reported after the barrier
            errors.append(exc)
        try:
            barrier.wait()
            if errors:
                return
            for item in mine:
                s = session.request(item, max_tokens)
                with lock:
                    samples.append(s)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            if session is not None:
                session.close()

    shares = [items[i::concurrency] for i in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(share,), daemon=True) for share in shares]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{mode} at concurrency {concurrency} failed: {errors[0]}") from errors[0]
    run = Run(mode, concurrency, image or size_name(items[0].size), max_tokens, seconds, samples)
    log(f"[bench] {mode:12s} c={concurrency:<2d} {run.image}: {len(samples)} requests, "
        f"{run.tokens / seconds:.1f} output tokens/s")
    return run


# -- transformers, in process: the baseline ------------------------------------------------------------
class TokenTimes:
    """A transformers streamer that notes when each generated token is ready."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        now = time.perf_counter() - self.t0
        self.times.extend([now] * value.numel())

    def end(self):
        pass


class TransformersBaseline:
    """`Qwen3VLMoeForConditionalGeneration.generate`: greedy, fp32, one request at a time; image
    decode and preprocessing are inside the timed request (the test suite's oracle builds the
    inputs the way a transformers user does)."""

    def __init__(self, checkpoint):
        from tests.oracle import Oracle

        self.oracle = Oracle(checkpoint)

    def request(self, item: Item, max_tokens: int) -> Sample:
        import torch

        t0 = time.perf_counter()
        inp = self.oracle.inputs(item.prompt, [item.image])  # decodes the PNG, runs the image processor
        streamer = TokenTimes(t0)
        with torch.inference_mode():
            self.oracle.model.generate(**inp.kwargs(), max_new_tokens=max_tokens, do_sample=False,
                                       eos_token_id=self.oracle.end_id, pad_token_id=self.oracle.end_id,
                                       streamer=streamer)
        times = streamer.times
        return Sample(times[0] if times else float("nan"), times, int(inp.input_ids.shape[1]))

    def ids(self, item: Item, max_tokens: int) -> list[int]:
        return self.oracle.generate(item.prompt, [item.image], max_tokens)

    def text(self, ids: list[int]) -> str:
        return self.oracle.text(ids)

    def close(self):
        pass


def input_tokens(preprocessor, item: Item) -> int:
    """Prompt length (image tokens included) as the server's preprocessing builds it."""
    return int(preprocessor(item.prompt, [item.image]).input_ids.size)


class Pool:
    """The bench's requests, each with an image no other request sends (seeds 0, 1, 2, ... in the
    order requests are taken): no row profits from a cache another row filled. The prompts go in
    turn as in `workload`."""

    def __init__(self, preprocessor=None):
        self.preprocessor = preprocessor
        self.next: dict[tuple[int, int], int] = {}
        self.prompt_lengths: dict[Item, int] = {}  # filled as items are taken (the sessions read it)

    def take(self, size: tuple[int, int], count: int) -> list[Item]:
        start = self.next.get(size, 0)
        self.next[size] = start + count
        items = [Item(PROMPTS[i % len(PROMPTS)], seeded_image(*size, seed=i), size)
                 for i in range(start, start + count)]
        if self.preprocessor is not None:
            self.prompt_lengths.update({it: input_tokens(self.preprocessor, it) for it in items})
        return items


# -- the served engine, in this process ---------------------------------------------------------------------
class EngineSession:
    """The served `tensorrt_llm`'s engine class in this process -- the same runner, dtype, weights
    file and threads (serve/cpu_engine.engine_threads) -- behind the
    package's preprocessing and vision encoder. `steps_ms` collects the seconds of every batch-1
    decode step, the in-process side of serving_ms_per_token."""

    def __init__(self, checkpoint, prompt_lengths: dict, settings: dict, runner: str = "auto",
                 dtype: str = "float32", gguf=None):
        import os

        from qwen3vl_triton.engine.engine import Engine
        from qwen3vl_triton.model.checkpoint import ModelSpec
        from qwen3vl_triton.model.vision import VisionEncoder
        from qwen3vl_triton.serve.cpu_engine import engine_threads
        from qwen3vl_triton.text.preprocess import Preprocessor

        spec = ModelSpec.load(checkpoint)
        self.spec, self.prompt_lengths, self.steps_ms = spec, prompt_lengths, []
        self.pre = Preprocessor(spec, max_images=settings.get("max_images", 2))
        self.enc = VisionEncoder(spec, dtype="float32" if dtype in ("q8_0", "q4_k") else dtype)
        prefill, decode = engine_threads(runner, os.cpu_count() or 1)  # as the served model takes them
        self.engine = Engine(spec, dtype=dtype, max_batch=settings["engine_max_batch"],
                             max_seq_len=settings["max_seq_len"], max_output_len=settings["max_output_len"],
                             threads=prefill, shared_threads=decode, runner=runner, gguf=gguf, on_step=self._step)
        self.runner = self.engine.runner_name

    def _step(self, report) -> None:
        if report.sequences == 1 and report.decode_tokens == 1:
            self.steps_ms.append(1e3 * report.seconds)

    def request(self, item: Item, max_tokens: int) -> Sample:
        import threading

        from qwen3vl_triton.engine.scheduler import Request
        from qwen3vl_triton.model.vision import EncodeRequest

        t0 = time.perf_counter()
        p = self.pre(item.prompt, [item.image])
        r = self.enc.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        times, done = [], threading.Event()

        def on_tokens(tokens, finish, error):
            now = time.perf_counter() - t0
            times.extend([now] * len(tokens))
            if finish is not None:
                done.set()

        self.engine.submit(Request(p.input_ids, max_tokens, end_id=self.spec.end_id, stop_ids=self.spec.end_ids,
                                   table=r.prompt_embedding_table, mrope_cos_sin=r.mrope_rotary_cos_sin,
                                   mrope_delta=r.mrope_position_deltas, on_tokens=on_tokens))
        if not done.wait(600):
            raise RuntimeError("the in-process engine did not finish a request in 600 s")
        return Sample(times[0] if times else float("nan"), times, int(p.input_ids.size))

    def close(self):
        self.engine.shutdown()


# -- the qwen3vl ensemble over gRPC streaming ------------------------------------------------------------
class EnsembleSession:
    """One gRPC client; each response of the stream is one generated token."""

    def __init__(self, url: str, prompt_lengths: dict):
        from client import Client

        self.client = Client(url, protocol="grpc")
        self.prompt_lengths = prompt_lengths
        self.texts: list[str] = []

    def request(self, item: Item, max_tokens: int) -> Sample:
        t0 = time.perf_counter()
        times, pieces = [], []
        for piece in self.client.generate(item.prompt, images=[item.image], max_tokens=max_tokens):
            times.append(time.perf_counter() - t0)
            pieces.append(piece)
        self.texts.append("".join(pieces))
        return Sample(times[0] if times else float("nan"), times, self.prompt_lengths.get(item, 0))

    def close(self):
        self.client.close()


class OpenStream:
    """One gRPC stream kept open across requests (the overhead figure must not include opening a
    stream per request, which the client library does)."""

    def __init__(self, url: str):
        import queue

        import tritonclient.grpc as grpcclient

        self.results: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.results.put((time.perf_counter(), result, error)))

    def stream(self, model: str, inputs: dict, timeout: float = 60) -> list[float]:
        """Send one request of numpy `inputs` to `model`, wait for its final response; return the
        arrival times of the responses that carry outputs (its tokens)."""
        from qwen3vl_triton.clients.grpc_stream import infer_input

        tensors = [infer_input(name, value) for name, value in inputs.items()]
        self.client.async_stream_infer(model, tensors, request_id=secrets.token_hex(8),
                                       enable_empty_final_response=True)
        times = []
        while True:
            at, result, error = self.results.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            if response.outputs:
                times.append(at)
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return times

    def generate(self, prompt: str, images: list[bytes], max_tokens: int, timeout: float = 60) -> list[float]:
        """One streamed `qwen3vl` request; the arrival times of its token responses."""
        from qwen3vl_triton.clients.qwen3vl import MODEL, Qwen3VLRequest

        return self.stream(MODEL, Qwen3VLRequest(prompt, images, max_tokens, stream=True).arrays(), timeout)

    def close(self):
        self.client.stop_stream()
        self.client.close()


# -- the disaggregated path ---------------------------------------------------------------------------------
class DisaggSession:
    """qwen3vl_triton.transfer.sender.Disaggregated: encode on the encoder server, move the table (shm or
    grpc), stream the generation from the language server. TTFT counts all three stages."""

    def __init__(self, encoder_url: str, language_url: str, transport: str, chunk_rows: int, prompt_lengths: dict):
        from qwen3vl_triton.transfer.sender import Disaggregated

        self.d = Disaggregated(encoder_url, language_url, transport=transport, chunk_rows=chunk_rows)
        self.prompt_lengths = prompt_lengths
        self.transfer_seconds: list[float] = []
        self.transfer_bytes = 0

    def request(self, item: Item, max_tokens: int) -> Sample:
        t0 = time.perf_counter()
        enc = self.d.encode(item.prompt, [item.image], max_tokens)
        corrid = secrets.randbits(62) + 1
        times, done = [], False
        try:
            before = self.d.stats.seconds
            self.d.transfer(corrid, enc, max_tokens)
            self.transfer_seconds.append(self.d.stats.seconds - before)
            self.transfer_bytes = enc.table_bytes
            for _, ids in self.d.stream(corrid):
                now = time.perf_counter() - t0
                times.extend([now] * len(ids))
            done = True
        finally:
            try:
                self.d.lang.end(corrid)
            except Exception:
                if done:  # otherwise the error that broke the request is the one to report
                    raise
        return Sample(times[0] if times else float("nan"), times, self.prompt_lengths.get(item, 0))

    def close(self):
        self.d.close()


def image_size_of(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size
