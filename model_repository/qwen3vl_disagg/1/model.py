"""qwen3vl_disagg: the disaggregated request driven from the encoder host (BLS + the package's sender)."""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import scalar
from qwen3vl_triton.backend.lifecycle import STOPPING, ServerStopWatch, Work, exit_stub
from qwen3vl_triton.backend.responses import error_response, send_response
from qwen3vl_triton.backend.tensors import model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.errors import Unavailable
from qwen3vl_triton.text.preprocess import TRTLLM_OPTIONAL_INPUTS, parse_options
from qwen3vl_triton.transfer.sender import Disaggregated, Encoded

INPUTS = ("text_input", "messages", "image", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream",
          *TRTLLM_OPTIONAL_INPUTS)
ENCODE_OUTPUTS = ["input_ids", "prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin",
                  "mrope_position_deltas"]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _send_text(sender, text, flags=0):
    send_response(pb_utils, sender, [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_))],
                  flags)


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        self.language_url = params["language_url"]
        self.chunk_rows = int(params["chunk_rows"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        workers, queued = int(params["workers"]), int(params["max_queue_size"])
        self.pool = worker_pool(workers, "disagg")
        # requests running or waiting for a worker: past the bound one is refused, as a full queue is
        self.slots = threading.BoundedSemaphore(workers + queued)
        self.max_queue_size = queued
        # when this server stops, every request still generating ends with an error
        self.work = Work()
        self.stop_watch = ServerStopWatch(llm_client.server_grpc_url(), self.cancel_check_seconds,
                                          busy=lambda: bool(self.work), on_stop=lambda: None)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = read_inputs(pb_utils, request, INPUTS)  # tensors are read here, not in the worker
                # end_id: the language server's checkpoint is not read here, so none is taken
                parse_options(x, scalar(x, "max_tokens", int, required=True), min_tokens=False)
                sampling = {"temperature": scalar(x, "temperature", float), "top_k": scalar(x, "top_k", int),
                            "top_p": scalar(x, "top_p", float), "seed": scalar(x, "seed", int)}
                if not self.slots.acquire(blocking=False):
                    raise Unavailable(f"Exceeds maximum queue size ({self.max_queue_size} requests wait for a worker)")
                self.pool.submit(self._run, sender, x, {k: v for k, v in sampling.items() if v is not None},
                                 scalar(x, "stream", bool, default=False))
            except Exception as exc:
                sender.send(error_response(pb_utils, exc, pb_utils.Logger), flags=FINAL)
        return None

    def _encode(self, x) -> Encoded:
        inputs = [pb_utils.Tensor(k, x[k]) for k in ("text_input", "messages", "image", "max_tokens")
                  if x[k] is not None]
        response = pb_utils.InferenceRequest(model_name="encode", inputs=inputs,
                                             requested_output_names=ENCODE_OUTPUTS).exec()
        if response.has_error():
            raise ValueError(response.error().message())
        out = {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in ENCODE_OUTPUTS}
        table = out["prompt_embedding_table"][0]
        return Encoded(input_ids=out["input_ids"].reshape(-1), rows=table.shape[0], hidden=table.shape[1],
                       mrope_cos_sin=out["mrope_rotary_cos_sin"].reshape(-1),
                       mrope_delta=int(out["mrope_position_deltas"].reshape(-1)[0]), table=table, dtype=table.dtype)

    def _run(self, sender, x, sampling, stream):
        try:
            self.work.start()
            enc = self._encode(x)
            max_tokens = int(x["max_tokens"].reshape(-1)[0])
            with Disaggregated(None, self.language_url, chunk_rows=self.chunk_rows) as d:
                pieces, cancelled = [], CancelPoll(sender.is_cancelled, self.cancel_check_seconds)
                for text in d.run(enc, max_tokens, **sampling):
                    if self.stop_watch.stopping.is_set():
                        raise Unavailable(STOPPING)
                    if stream and not cancelled():
                        _send_text(sender, text)
                    pieces.append(text)
            if stream:
                sender.send(flags=FINAL)
            else:
                _send_text(sender, "".join(pieces), FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
        finally:
            self.work.finish()
            self.slots.release()

    def finalize(self):
        self.stop_watch.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        exit_stub()
