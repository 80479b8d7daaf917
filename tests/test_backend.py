"""The Python-backend glue that runs on the engine's delivery thread: rate-limited cancellation
checks, period-flushed engine metrics (both are round trips to the server in a stub), and
response sends."""

import gc
import threading
import weakref

import numpy as np

from qwen3vl_triton.backend.metrics import EngineMetrics
from qwen3vl_triton.backend.responses import error, send_response
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.engine.engine import Engine
from qwen3vl_triton.engine.scheduler import StepReport
from qwen3vl_triton.errors import InputError, Unavailable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Sink:
    """Stands in for triton_python_backend_utils' metric classes: records every update sent."""

    def __init__(self):
        self.sent = []
        sink = self

        class MetricFamily:
            COUNTER, GAUGE = "counter", "gauge"

            def __init__(self, name, help_text, kind):
                self.name = name

            def Metric(self, labels):  # noqa: N802 -- the backend's spelling
                family = self

                class Metric:
                    def increment(self, value):
                        sink.sent.append((family.name, "+", value))

                    def set(self, value):
                        sink.sent.append((family.name, "=", value))

                return Metric()

        self.MetricFamily = MetricFamily


def test_cancel_poll_asks_once_per_period_and_keeps_a_cancellation():
    clock, asked, state = Clock(), [], {"cancelled": False}
    poll = CancelPoll(lambda: asked.append(clock.now) or state["cancelled"], period=0.5, clock=clock)
    for _ in range(50):  # a burst of tokens inside the first period: nobody is asked
        assert not poll()
    assert asked == []
    clock.now += 0.5
    assert not poll() and len(asked) == 1
    state["cancelled"] = True
    clock.now += 0.25
    assert not poll() and len(asked) == 1  # seen one period after the last check, not before
    clock.now += 0.25
    assert poll() and len(asked) == 2
    clock.now += 4.0
    assert poll() and len(asked) == 2  # a cancellation is final: no more round trips


def report(sequences, prompt=0, generated=0, running=1, waiting=0):
    return StepReport(sequences, prompt, sequences - (prompt > 0), generated, 0.01, running, waiting)


def totals(sent):
    out = {}
    for name, op, value in sent:
        out[name] = out.get(name, 0) + value if op == "+" else value
    return out


def test_engine_metrics_are_sent_once_per_period_with_nothing_lost():
    sink, clock = Sink(), Clock()
    m = EngineMetrics(sink, {"model": "tensorrt_llm"}, period=0.5, clock=clock)
    steps = [report(1, prompt=40, generated=1)] + [report(3, generated=3, running=3, waiting=2)] * 30
    for r in steps:
        clock.now += 0.0078125  # 2**-7 s: exact in binary, 31 steps stay inside one period
        m.on_step(r)
    flushes = sum(1 for name, *_ in sink.sent if name == "qwen3vl_engine_steps_total")
    assert flushes == 0  # 0.24 s of steps: inside one period
    clock.now += 0.5
    m.on_step(report(3, generated=3, running=3, waiting=2))
    got = totals(sink.sent)
    assert got["qwen3vl_engine_steps_total"] == 32
    assert got["qwen3vl_engine_batched_steps_total"] == 31
    assert got["qwen3vl_engine_prompt_tokens_total"] == 40
    assert got["qwen3vl_engine_generated_tokens_total"] == 1 + 3 * 31
    assert got["qwen3vl_engine_running_sequences"] == 3 and got["qwen3vl_engine_waiting_requests"] == 2
    sent = len(sink.sent)
    clock.now += 1.0
    m.on_step(report(3, generated=3, running=3, waiting=2))
    gauges = [s for s in sink.sent[sent:] if s[1] == "="]
    assert gauges == []  # unchanged gauges are not sent again


def test_engine_metrics_are_exact_as_soon_as_the_engine_is_idle():
    sink, clock = Sink(), Clock()
    m = EngineMetrics(sink, {"model": "tensorrt_llm"}, period=10.0, clock=clock)
    m.on_step(report(2, generated=2, running=2))
    m.on_step(report(2, generated=2, running=0))  # both finished: idle, whatever the period
    got = totals(sink.sent)
    assert got["qwen3vl_engine_steps_total"] == 2 and got["qwen3vl_engine_generated_tokens_total"] == 4
    assert got["qwen3vl_engine_running_sequences"] == 0
    m.on_step(StepReport(0, 0, 0, 0, 0.0, 0, 0))  # the engine's report when cancellations emptied it
    assert totals(sink.sent)["qwen3vl_engine_steps_total"] == 2  # not a step


def test_the_engine_reports_a_batch_emptied_by_cancellation(spec, pipeline):
    reports, cancelled = [], threading.Event()
    engine = Engine(spec, max_batch=4, max_seq_len=2048, max_output_len=256, on_step=reports.append)
    try:
        req = pipeline("Go on forever.", [], max_new_tokens=200)
        req.on_tokens = lambda tokens, finish, error: (
            engine.cancel(req.request_id) if finish is None else cancelled.set())
        engine.submit(req)
        assert cancelled.wait(30)
        deadline = threading.Event()
        for _ in range(100):
            if reports and reports[-1].sequences == 0:
                break
            deadline.wait(0.05)
        last = reports[-1]
        assert (last.sequences, last.running, last.waiting) == (0, 0, 0)
        assert all(r.sequences > 0 for r in reports[:-1])
    finally:
        engine.shutdown()


def test_send_response_keeps_the_outputs_alive_while_send_prunes_them():
    # Triton 2.51's `send` drops the outputs the request did not ask for with the GIL released:
    # if that dropped the last reference, the numpy array would be freed without the GIL.
    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors):
            self.output_tensors = output_tensors

    class pb:  # noqa: N801 -- stands in for the module
        pass

    pb.Tensor, pb.InferenceResponse = Tensor, InferenceResponse
    seen = {}

    class Sender:
        def send(self, response, flags=0):
            dropped = weakref.ref(next(t.array for t in response.output_tensors if t.name == "sequence_length"))
            response.output_tensors = [t for t in response.output_tensors if t.name == "output_ids"]  # the prune
            gc.collect()
            seen["alive_after_prune"] = dropped() is not None
            seen["flags"] = flags
            seen["sent"] = [t.name for t in response.output_tensors]

    send_response(pb, Sender(), [Tensor("output_ids", np.zeros((1, 1, 1), np.int32)),
                                 Tensor("sequence_length", np.ones((1, 1), np.int32))], flags=7)
    assert seen == {"alive_after_prune": True, "flags": 7, "sent": ["output_ids"]}


def test_errors_map_to_triton_codes():
    # A full engine queue is UNAVAILABLE (retry later), a bad input INVALID_ARG naming it, and
    # anything else INTERNAL.
    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message, code=INTERNAL):
            self.message, self.code = message, code

    class pb:  # noqa: N801 -- stands in for the module
        pass

    pb.TritonError = TritonError
    full = error(pb, Unavailable("engine queue full: the 2 places ... are taken"))
    assert (full.code, full.message) == ("UNAVAILABLE", "engine queue full: the 2 places ... are taken")
    bad = error(pb, InputError("end_id", "must be a vocabulary id"))
    assert (bad.code, bad.message) == ("INVALID_ARG", "end_id: must be a vocabulary id")
    assert error(pb, ZeroDivisionError("x")).code == "INTERNAL"


def test_a_stream_that_fails_midway_sends_the_error_then_the_end_apart():
    # Triton 2.51 never hands a decoupled BLS caller an error response that follows earlier
    # responses: an error that also carried FINAL left such a caller waiting for ever. The error
    # goes out on its own, then an empty final response that does reach the caller.
    from qwen3vl_triton.backend.token_stream import TokenStream

    FINAL = 1

    class pb:  # noqa: N801 -- stands in for the module
        TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL

        class TritonError:
            def __init__(self, message, code=None):
                self.message = message

        class Tensor:
            def __init__(self, name, value):
                self.name, self.value = name, value

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error = list(output_tensors), error

    sent = []

    class Sender:
        def send(self, response=None, flags=0):
            kind = None if response is None else ("error:" + response.error.message if response.error
                                                  else [t.name for t in response.output_tensors])
            sent.append((kind, flags))

        def is_cancelled(self):
            return False

    stream = TokenStream(pb, Sender(), engine=None, streaming=True, logger=None, cancel_check_seconds=10)
    stream.on_tokens([5], None, None)
    stream.on_tokens([], "error", "non-finite logits")
    assert sent == [(["output_ids", "sequence_length"], 0), ("error:non-finite logits", 0), (None, FINAL)]


def test_a_worker_pool_starts_all_its_threads_at_once_and_keeps_that_count_under_load():
    before = threading.active_count()
    pool = worker_pool(5, "test-pool")
    try:
        assert threading.active_count() - before == 5
        gate = threading.Event()
        busy = [pool.submit(gate.wait, 5) for _ in range(12)]  # more tasks than threads
        assert threading.active_count() - before == 5
        gate.set()
        assert all(f.result() for f in busy)
        assert threading.active_count() - before == 5
    finally:
        pool.shutdown(wait=True)
    assert threading.active_count() == before


def test_prefix_cache_metrics_count_the_engine_totals_once():
    from qwen3vl_triton.engine.prefix import PrefixStats

    sink, clock = Sink(), Clock()
    m = EngineMetrics(sink, {"model": "tensorrt_llm"}, period=10.0, clock=clock)
    first = report(1, prompt=40, generated=1, running=0)
    first.prefix = PrefixStats(hit_tokens=0, miss_tokens=40, evictions=0, bytes=4096)
    m.on_step(first)
    second = report(1, prompt=8, generated=1, running=0)
    second.prefix = PrefixStats(hit_tokens=32, miss_tokens=48, evictions=1, bytes=2048)
    m.on_step(second)
    got = totals(sink.sent)
    assert got["qwen3vl_prefix_cache_hit_tokens_total"] == 32
    assert got["qwen3vl_prefix_cache_miss_tokens_total"] == 48
    assert got["qwen3vl_prefix_cache_evictions_total"] == 1
    assert got["qwen3vl_prefix_cache_bytes"] == 2048
