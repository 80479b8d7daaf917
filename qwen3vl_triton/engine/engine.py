"""The engine's public API and its two threads (plan -> run -> update, and delivery).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Callable

import torch

from qwen3vl_triton.arrays import to_torch
from qwen3vl_triton.contract import Bounds, FinishReason
from qwen3vl_triton.engine.prefix import PrefixCache
from qwen3vl_triton.engine.runner import DECODE_THREADS, KVPrefixStore, Runner
from qwen3vl_triton.engine.scheduler import Request, Scheduler, StepReport
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.lm import LanguageModel


class Engine:
    def __init__(self, spec: ModelSpec, dtype: str = "float32", max_batch: int = 16,
                 max_seq_len: int | None = None, max_num_tokens: int = 1024, max_output_len: int | None = None,
                 on_step: Callable[["StepReport"], None] | None = None, threads: int | None = None,
                 shared_threads: int = DECODE_THREADS, parallel_min_tokens: int = 64, max_queue: int = 128,
                 runner: str = "torch", gguf: str | None = None, kv_cache_bytes: int = 0):
        """`on_step` is called after every step, e.g. to export metrics, and with a report of zero
        sequences when cancellations empty the batch without a step. `max_queue` bounds the
        requests waiting for a place in the running batch; past it `submit` raises Unavailable.

        Callbacks (each request's `on_tokens`, and `on_step`) run on one delivery thread, in the
        order the engine produced them, while the engine thread goes on with the next step: in
        the server they hand responses to Triton, and each `send` waits for the server. Only
        that thread calls them, so a consumer never sees two callbacks at once. (In a Triton
        2.51 stub, a send beside the engine's torch work needs `backend.send_response`: without
        it the stub crashed, see there.) `threads`, `shared_threads`, `parallel_min_tokens`: see
        `Runner`.

        `runner`: "torch" (`Runner` over `lm.LanguageModel`, the exact reference), "ggml" (the step
        on llama.cpp's kernels, `ggml_runner.GgmlRunner`; raises `ggml_runner.Unsupported` with the
        reason for a checkpoint llama.cpp cannot serve) or "auto" (ggml where it can, else torch;
        `runner_note` says why). `gguf`: the ggml runner's weights file (default: converted from
        the checkpoint into build/ggml at the first start).

        `kv_cache_bytes`: the prefix cache's budget (engine.prefix: finished sequences' KV kept and
        reused by sequences that start with the same tokens, images and positions); 0: off.
        `prefix_note` says why a runner could not reuse any (the budget holds no entry)."""
        self.spec = spec
        self.max_seq_len = min(max_seq_len or 4096, spec.max_position_embeddings)
        self.max_output_len = max_output_len or self.max_seq_len
        threads = threads or torch.get_num_threads()
        self.runner_name, self.runner_note, self.lm = "torch", None, None
        if runner not in ("torch", "ggml", "auto"):
            raise ValueError(f"runner must be torch, ggml or auto, got {runner!r}")
        if runner != "torch":
            from qwen3vl_triton.engine.ggml_runner import GgmlRunner, Unsupported
            try:
                self.runner = GgmlRunner(spec, dtype, slots=max_batch, max_len=self.max_seq_len,
                                         max_num_tokens=max_num_tokens, threads=threads, shared_threads=shared_threads,
                                         parallel_min_tokens=parallel_min_tokens, gguf=gguf,
                                         prefix_bytes=kv_cache_bytes)
                self.runner_name, cache = "ggml", self.runner.cache
            except Unsupported as exc:
                if runner == "ggml" or dtype not in ("float32", "bfloat16", "float16"):
                    raise  # asked for ggml, or a dtype only the ggml runner serves (q8_0, q4_k)
                self.runner_note = f"the torch runner serves: {exc}"
        if self.runner_name == "torch":
            self.lm = LanguageModel(spec, dtype=dtype, slots=max_batch, max_len=self.max_seq_len)
            self.runner = Runner(self.lm, threads, min(shared_threads, threads), parallel_min_tokens)
            cache = self.lm.cache
        store = cache if self.runner_name == "ggml" else KVPrefixStore(cache)
        self.prefix_note = getattr(self.runner, "prefix_note", None)
        prefix = PrefixCache(spec, store, kv_cache_bytes) if kv_cache_bytes and self.prefix_note is None else None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.scheduler = Scheduler(spec, cache, max_batch, self.max_seq_len, max_num_tokens, max_queue,
                                   emit=lambda callback, args: self._outbox.put((callback, args)), on_step=on_step,
                                   prefix=prefix)
        self.prefix = prefix  # None: no KV reuse
        self.stats = self.scheduler.stats
        self.bounds = Bounds.of(spec, max_seq_len=self.max_seq_len, max_output_len=self.max_output_len)
        self._ids = itertools.count()
        self._delivery = threading.Thread(target=self._deliver, name="engine-delivery", daemon=True)
        self._delivery.start()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        """Raise InputError naming the contract input that is wrong (contract.validate)."""
        req.validate(self.bounds)

    def submit(self, req: Request) -> str:
        """Queue a request (validated) and return its id; tokens arrive through `req.on_tokens`.
        Raises InputError for a bad request, Unavailable when the queue is full."""
        if req.table is not None:
            req.table = to_torch(req.table)  # the model reads it as a tensor (numpy from a parser)
        self.validate(req)
        if not req.request_id:
            req.request_id = f"r{next(self._ids)}"
        self.scheduler.add(req)
        return req.request_id

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def generate(self, req: Request, timeout: float | None = None) -> tuple[list[int], FinishReason]:
        """Blocking helper: all generated ids and the finish reason."""
        out: list[int] = []
        done = threading.Event()
        result: dict = {}

        def on_tokens(tokens, finish, error):
            out.extend(tokens)
            if finish is not None:
                result["finish"], result["error"] = finish, error
                done.set()

        req.on_tokens = on_tokens
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req.request_id)
            raise TimeoutError("generation did not finish in time")
        if result["finish"] is FinishReason.ERROR:
            raise RuntimeError(result["error"])
        return out, result["finish"]

    def load(self) -> int:
        """Sequences running or waiting."""
        return self.scheduler.load()

    def close(self, reason: str) -> None:
        """End every request with the error `reason` and refuse new ones (the server is stopping)."""
        self.scheduler.close(reason)

    def shutdown(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=10)
        self._outbox.put(None)  # after everything the engine thread queued: that still goes out
        self._delivery.join(timeout=10)

    # -- the two threads -------------------------------------------------------------------------
    def _loop(self) -> None:
        """The engine thread: plan, run, update."""
        while True:
            try:
                plan = self.scheduler.next_plan()
                if plan is None:
                    return
                if not plan:
                    continue
                t0 = time.perf_counter()
                results = self.runner.run(plan)
                self.scheduler.update(plan, results, time.perf_counter() - t0)
            except Exception as exc:  # a scheduler bug must fail requests, never hang them
                self.scheduler.fail_all(f"engine failure: {type(exc).__name__}: {exc}")

    def _deliver(self) -> None:
        """The delivery thread: call the callbacks the engine queued, in order."""
        while (item := self._outbox.get()) is not None:
            callback, args = item
            try:
                callback(*args)
            except Exception:  # a broken consumer (or metrics) must never stop the others
                pass
