"""Glue between Triton's Python backend and the package, shared by every model.py.

`pb` is the `triton_python_backend_utils` module, passed in because it exists only inside the
backend's stub process.
"""

from __future__ import annotations

import faulthandler
import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from .errors import InputError, Unavailable

# numpy has no bfloat16; ml_dtypes' (the dtype tritonclient uses for BF16) holds bf16 tables as
# numpy arrays. They cross the Python backend through DLPack: the stub refuses as_numpy() and
# pb.Tensor(name, array) for BF16.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# A stub that dies of a signal (SIGSEGV, SIGBUS, SIGABRT) writes every thread's Python stack to
# its stderr, which is the server's log: Triton itself only notices later that the stub is gone.
faulthandler.enable()


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a serving dtype name ("float32", "float16", "bfloat16")."""
    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def to_torch(array):
    """A torch tensor over a numpy array (bfloat16 included), without a copy."""
    import torch

    if isinstance(array, torch.Tensor):
        return array
    array = np.ascontiguousarray(array)
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def as_numpy(tensor) -> np.ndarray:
    """A pb.Tensor's data as numpy (a BF16 tensor through DLPack, without a copy). The 2.51 stub
    cannot return a tensor's dtype to Python (triton_dtype() raises), so BF16 shows itself by
    as_numpy() refusing it."""
    try:
        return tensor.as_numpy()
    except Exception as exc:
        if "BF16" not in str(exc):
            raise
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).view(torch.int16).numpy().view(BFLOAT16)


def model_params(args: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` of a model's config."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def read_inputs(pb, request, names) -> dict[str, np.ndarray | None]:
    """Every named input as numpy (None when an optional input is absent). Read inside `execute`."""
    out = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else as_numpy(tensor)
    return out


def scalar(arrays: dict, name: str, kind, default=None, required: bool = False):
    """The single value of a `[1]`-shaped input (batch dimension included), converted by `kind`."""
    value = arrays.get(name)
    if value is None:
        if required:
            raise InputError(name, "is required")
        return default
    if value.size != 1:
        raise InputError(name, f"expected one value, got shape {list(value.shape)}")
    return kind(value.reshape(-1)[0])


def single_sequence(arrays: dict, name: str) -> np.ndarray:
    """A per-request tensor with the batch dimension removed; a batch of more than one is refused."""
    value = arrays.get(name)
    if value is None:
        raise InputError(name, "is required")
    if value.ndim == 0 or value.shape[0] != 1:
        raise InputError(name, f"send one sequence per request (batch size 1), got shape {list(value.shape)}")
    return value[0]


def error(pb, exc: BaseException, logger=None):
    """A TritonError for `exc`: INVALID_ARG with the message for bad input, UNAVAILABLE for a server at
    a bound, INTERNAL otherwise."""
    if isinstance(exc, InputError):
        return pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
    if isinstance(exc, Unavailable):
        return pb.TritonError(str(exc), pb.TritonError.UNAVAILABLE)
    if logger is not None:
        logger.log_error(f"internal error: {''.join(traceback.format_exception(exc))}")
    return pb.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb.TritonError.INTERNAL)


def error_response(pb, exc: BaseException, logger=None):
    return pb.InferenceResponse(error=error(pb, exc, logger))


def send_response(pb, sender, tensors: list, flags: int = 0) -> None:
    """`sender.send` of a response with `tensors`, which stay referenced here until it returns.

    Triton 2.51's Python backend drops the outputs a request did not ask for inside `send`,
    after releasing the GIL, and so freed the numpy arrays of those tensors without the GIL
    (python_backend #390, fixed in 24.12). With another Python thread running, that corrupts
    the interpreter's memory: the `tensorrt_llm` stub crashed in torch ops on the engine thread
    while `language`, which asks it for `output_ids` only, was being answered. Held here, the
    arrays are freed after `send`, with the GIL."""
    sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)


def output_tensor(pb, name: str, value):
    """A pb.Tensor from numpy or torch: through DLPack for a tensor on a GPU (no host copy) and
    for bfloat16, which numpy cannot carry to the stub."""
    import torch

    if isinstance(value, np.ndarray) and value.dtype == BFLOAT16:
        value = to_torch(value)
    if isinstance(value, torch.Tensor):
        if value.is_cuda or value.dtype == torch.bfloat16:
            return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
        value = value.numpy()
    return pb.Tensor(name, np.ascontiguousarray(value))


def worker_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose `workers` threads all start now. A pool otherwise adds threads as load
    rises, so a stub's thread count would depend on the traffic it has seen; fixed from the start,
    a thread that leaks stands out."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    started = threading.Barrier(workers)  # each task holds its thread until all have one
    for task in [pool.submit(started.wait) for _ in range(workers)]:
        task.result()
    return pool


class CancelPoll:
    """`is_cancelled()` asked at most once per `period` seconds; the answer is kept in between.

    Each call of a response sender's `is_cancelled` is a round trip between the stub and the
    server (~0.1 ms here); asked for every token, that was 5% of a batch-8 decode step. Like the
    tensorrtllm backend's `cancellation_check_period_ms`, a cancellation is seen within one
    period; the first check comes one period after the request arrived.
    """

    def __init__(self, is_cancelled, period: float, clock=time.monotonic):
        self.is_cancelled, self.period, self.clock = is_cancelled, period, clock
        self.last = clock()
        self.cancelled = False

    def __call__(self) -> bool:
        if not self.cancelled:
            now = self.clock()
            if now - self.last >= self.period:
                self.last = now
                self.cancelled = bool(self.is_cancelled())
        return self.cancelled


class Gauges:
    """Sets gauges of `metrics` (name -> pb Metric), skipping a value the gauge already shows:
    each set is a round trip between the stub and the server."""

    def __init__(self, metrics: dict):
        self.metrics = metrics
        self.sent: dict[str, float] = {}

    def set(self, name: str, value) -> None:
        if self.sent.get(name) != value:
            self.metrics[name].set(value)
            self.sent[name] = value


class EngineMetrics:
    """The engine's counters and gauges on Triton's /metrics endpoint, sent at most once per
    `period` seconds and whenever the engine goes idle (each update is a round trip to the
    server, ~27 us; seven per step cost ~1% of a batch-8 decode step and sat on its path).
    Like the tensorrtllm backend's `stats_check_period_ms`."""

    COUNTERS = {
        "steps": "engine steps (forward passes)",
        "batched_steps": "engine steps that advanced more than one sequence",
        "prompt_tokens": "prompt tokens prefilled",
        "generated_tokens": "tokens generated",
    }
    GAUGES = {
        "running_sequences": "sequences in the running batch",
        "waiting_requests": "requests waiting for a place in the batch",
        "last_step_sequences": "sequences advanced by the last step",
    }

    def __init__(self, pb, labels: dict[str, str], period: float, clock=time.monotonic):
        self.families, self.metrics = {}, {}
        for kind, names, suffix in ((pb.MetricFamily.COUNTER, self.COUNTERS, "_total"),
                                    (pb.MetricFamily.GAUGE, self.GAUGES, "")):
            for name, help_text in names.items():
                self.families[name] = pb.MetricFamily(f"qwen3vl_engine_{name}{suffix}", help_text, kind)
                self.metrics[name] = self.families[name].Metric(labels=labels)
        self.period, self.clock = period, clock
        self.last = clock()
        self.pending = dict.fromkeys(self.COUNTERS, 0)
        self.gauges: dict[str, int] = {}  # latest values, sent by flush
        self.sender = Gauges(self.metrics)

    def on_step(self, report) -> None:
        """Engine callback (delivery thread). A report of no sequences: the engine went idle."""
        p = self.pending
        if report.sequences:
            p["steps"] += 1
            p["batched_steps"] += report.sequences > 1
            self.gauges["last_step_sequences"] = report.sequences
        p["prompt_tokens"] += report.prompt_tokens
        p["generated_tokens"] += report.generated
        self.gauges["running_sequences"] = report.running
        self.gauges["waiting_requests"] = report.waiting
        now = self.clock()
        if now - self.last >= self.period or (report.running == 0 and report.waiting == 0):
            self.flush(now)

    def flush(self, now: float) -> None:
        self.last = now
        for name in self.COUNTERS:
            if self.pending[name]:
                self.metrics[name].increment(self.pending[name])
                self.pending[name] = 0
        for name, value in self.gauges.items():
            self.sender.set(name, value)

    def close(self) -> None:
        # A Metric must go before its MetricFamily: left to interpreter teardown, the order is
        # arbitrary and the stub crashes on exit.
        self.metrics.clear()
        self.families.clear()


class TokenStream:
    """Sends one request's engine tokens as `tensorrt_llm` responses (output_ids, sequence_length).

    Streaming: one response per new token, the last one carrying the FINAL flag; otherwise one
    response with all tokens. A cancelled request (seen within `cancel_check_seconds`) stops
    its generation and is closed with FINAL.
    """

    def __init__(self, pb, sender, engine, streaming: bool, logger, cancel_check_seconds: float):
        self.pb, self.sender, self.engine = pb, sender, engine
        self.streaming = streaming
        self.client_cancelled = CancelPoll(sender.is_cancelled, cancel_check_seconds)
        self.logger = logger
        self.tokens: list[int] = []
        self.request_id = ""
        self.cancelled = False

    def _send_tokens(self, tokens: list[int], flags: int) -> None:
        ids = np.asarray(tokens, dtype=np.int32).reshape(1, 1, -1)
        send_response(self.pb, self.sender, [
            self.pb.Tensor("output_ids", ids),
            self.pb.Tensor("sequence_length", np.asarray([[len(tokens)]], dtype=np.int32)),
        ], flags)

    def _send_cancelled(self) -> None:
        pb = self.pb
        self.sender.send(pb.InferenceResponse(error=pb.TritonError("request cancelled", pb.TritonError.CANCELLED)),
                         flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def on_tokens(self, tokens: list[int], finish: str | None, err: str | None) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.cancelled and self.client_cancelled():
            self.cancelled = True
            self.engine.cancel(self.request_id)
        if self.cancelled or finish == "cancelled":
            if finish is not None:
                self._send_cancelled()
            return
        if finish == "error":
            # The error, then the end on its own: Triton 2.51 never hands a decoupled BLS caller an
            # error response that follows earlier responses, and one that also carried the FINAL flag
            # would leave that caller waiting for ever; the empty final one reaches it.
            self.sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(err or "generation failed")))
            self.sender.send(flags=final)
            return
        if self.streaming:
            if tokens:
                self._send_tokens(tokens, final if finish else 0)
            elif finish:
                self.sender.send(flags=final)
            return
        self.tokens.extend(tokens)
        if finish:
            self._send_tokens(self.tokens, final)
