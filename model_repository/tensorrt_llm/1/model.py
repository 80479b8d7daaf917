"""tensorrt_llm on CPU: the package's in-flight batching engine behind the tensorrtllm contract.

`execute` only validates and queues; the engine's delivery thread streams tokens back through each
request's response sender, so requests that arrive while others decode join the running batch.
Engine counters are exported on the server's /metrics endpoint.
"""

import collections
import itertools
import threading

import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend import EngineMetrics, TokenStream, error, model_params, read_inputs
from qwen3vl_triton.checkpoint import ModelSpec
from qwen3vl_triton.engine import CONTRACT_INPUTS, Engine, request_from_contract


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.metrics = EngineMetrics(pb_utils, labels, period=int(params["stats_check_period_ms"]) / 1e3)
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        spec = ModelSpec.load(params["checkpoint"])
        # The engine thread does the model's work; this thread (the stub's main one) only parses
        # requests and must never start an OpenMP team of its own: with two teams alive OpenMP
        # counts more threads than cores and puts the engine's helper thread to sleep after
        # every op, which made the engine's prefill 1.6x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.engine = Engine(spec, dtype=params["dtype"], max_batch=int(params["max_batch"]),
                             max_seq_len=int(params["max_seq_len"]), max_output_len=int(params["max_output_len"]),
                             max_num_tokens=int(params["max_num_tokens"]), max_queue=int(params["max_queue"]),
                             on_step=self.metrics.on_step, threads=threads)
        # `stop` (as in the tensorrtllm backend): a request with stop=true ends the running requests
        # that carry its request id. Triton request id -> engine ids of the running ones.
        self.running: dict[str, set[str]] = collections.defaultdict(set)
        self.running_lock = threading.Lock()
        self.ids = itertools.count()

    def _stop(self, request_id: str) -> None:
        with self.running_lock:
            for engine_id in self.running.get(request_id, ()):
                self.engine.cancel(engine_id)

    def _untrack(self, request_id: str, engine_id: str) -> None:
        with self.running_lock:
            ids = self.running.get(request_id)
            if ids is not None:
                ids.discard(engine_id)
                if not ids:
                    del self.running[request_id]

    def _track(self, request_id: str, engine_id: str, stream: TokenStream):
        def on_tokens(tokens, finish, err):
            stream.on_tokens(tokens, finish, err)
            if finish is not None:
                self._untrack(request_id, engine_id)
        with self.running_lock:
            self.running[request_id].add(engine_id)
        return on_tokens

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                stop = read_inputs(pb_utils, request, ("stop",))["stop"]
                if stop is not None and bool(stop.reshape(-1)[0]):
                    self._stop(request.request_id())
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                req, streaming = request_from_contract(read_inputs(pb_utils, request, CONTRACT_INPUTS),
                                                       self.engine.spec)
                stream = TokenStream(pb_utils, sender, self.engine, streaming, pb_utils.Logger,
                                     cancel_check_seconds=self.cancel_check_seconds)
                req.request_id = f"t{next(self.ids)}"
                req.on_tokens = self._track(request.request_id(), req.request_id, stream) if request.request_id() \
                    else stream.on_tokens
                try:
                    stream.request_id = self.engine.submit(req)
                except Exception:
                    self._untrack(request.request_id(), req.request_id)
                    raise
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        self.engine.shutdown()
        self.metrics.close()
