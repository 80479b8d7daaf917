"""tensorrt_llm on CPU: the package's in-flight batching engine behind the tensorrtllm contract.

`execute` only validates and queues; the engine's delivery thread streams tokens back through each
request's response sender, so requests that arrive while others decode join the running batch.
Engine counters are exported on the server's /metrics endpoint. As in the tensorrtllm backend, a
request with `stop` set cancels the running requests that carry its request id.
"""

import threading

import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend.lifecycle import STOPPING, ServerStopWatch, exit_stub
from qwen3vl_triton.backend.metrics import EngineMetrics
from qwen3vl_triton.backend.responses import error
from qwen3vl_triton.backend.tensors import model_params, read_inputs
from qwen3vl_triton.backend.token_stream import TokenStream
from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.contract import INPUTS, FinishReason, StopRequest
from qwen3vl_triton.engine import Engine, Request
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.serve.cpu_engine import engine_threads


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
        prefill_threads, decode_threads = engine_threads(params["cpu_runner"], torch.get_num_threads(),
                                                         int(params["prefill_threads"]), int(params["decode_threads"]))
        torch.set_num_threads(1)
        self.running, self._lock = {}, threading.Lock()  # Triton request id -> its running TokenStreams
        self.stopped = set()  # TokenStreams a `stop` request ended
        self.engine = Engine(spec, dtype=params["dtype"], max_batch=int(params["max_batch"]),
                             max_seq_len=int(params["max_seq_len"]), max_output_len=int(params["max_output_len"]),
                             max_num_tokens=int(params["max_num_tokens"]), max_queue=int(params["max_queue"]),
                             on_step=self.metrics.on_step, threads=prefill_threads, shared_threads=decode_threads,
                             runner=params["cpu_runner"], gguf=params["gguf"] or None,
                             kv_cache_bytes=int(params["kv_cache_bytes"]))
        # when the server stops, every generation ends with an error its caller receives
        self.stop_watch = ServerStopWatch(llm_client.server_grpc_url(), self.cancel_check_seconds,
                                          busy=lambda: self.engine.load() > 0,
                                          on_stop=lambda: self.engine.close(STOPPING))
        if self.engine.runner_note:
            pb_utils.Logger.log_warn(self.engine.runner_note)
        if self.engine.prefix_note:
            pb_utils.Logger.log_warn(self.engine.prefix_note)
        pb_utils.Logger.log_info(f"tensorrt_llm: the {self.engine.runner_name} runner serves, dtype {params['dtype']}")
        self.metrics.info(runner=self.engine.runner_name, dtype=params["dtype"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = read_inputs(pb_utils, request, INPUTS)
                if StopRequest.asked(x):
                    if not request.request_id():
                        raise StopRequest.missing_id()
                    self._stop(request.request_id())
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                req = Request.from_arrays(x, default_end_id=self.engine.spec.end_id)
                stream = TokenStream(pb_utils, sender, self.engine, req.streaming, pb_utils.Logger,
                                     cancel_check_seconds=self.cancel_check_seconds)
                req.on_tokens = self._track(request.request_id(), stream)
                try:
                    stream.request_id = self.engine.submit(req)
                except BaseException:
                    self._untrack(request.request_id(), stream)
                    raise
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _track(self, triton_id, stream):
        """Keep `stream` under its Triton request id while it runs (for `stop`); returns the
        engine callback that forgets it when the request finishes."""
        if not triton_id:
            return stream.on_tokens
        with self._lock:
            self.running.setdefault(triton_id, set()).add(stream)

        def on_tokens(tokens, finish, err):
            if finish is not None and self._untrack(triton_id, stream) and finish == FinishReason.CANCELLED:
                # stopped: the request ends as an ordinary one does, as in the tensorrtllm backend (and
                # an error response sent here never reaches a decoupled BLS caller on Triton 2.51)
                finish = FinishReason.STOPPED
            stream.on_tokens(tokens, finish, err)

        return on_tokens

    def _untrack(self, triton_id, stream) -> bool:
        """Forget `stream`; True if a `stop` request ended it."""
        with self._lock:
            streams = self.running.get(triton_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self.running[triton_id]
            if stream in self.stopped:
                self.stopped.discard(stream)
                return True
            return False

    def _stop(self, triton_id):
        with self._lock:
            streams = self.running.get(triton_id, set())
            self.stopped |= streams
        for stream in streams:
            self.engine.cancel(stream.request_id)

    def finalize(self):
        self.stop_watch.close()
        self.engine.shutdown()
        self.metrics.close()
        exit_stub()
