"""qwen3vl_disagg: the disaggregated request driven from the encoder host (BLS + the package's sender).

One `Disaggregated` per model instance, made in `initialize`: its channel and stream to the language
server serve every request (from the worker pool's threads)."""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend.lifecycle import STOPPING, ServerStopWatch, Work, exit_stub
from qwen3vl_triton.backend.responses import error, error_response, send_response
from qwen3vl_triton.backend.tensors import as_numpy, model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.clients.qwen3vl import ENCODE_MODEL, INPUTS, Qwen3VLRequest
from qwen3vl_triton.contract import ENCODE_OUTPUTS
from qwen3vl_triton.errors import QUEUE_SIZE, RemoteError, Unavailable
from qwen3vl_triton.text.preprocess import TRTLLM_OPTIONAL_INPUTS, parse_options
from qwen3vl_triton.transfer.sender import Disaggregated, Encoded

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _send_text(sender, text, flags=0):
    send_response(pb_utils, sender, [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_))],
                  flags)


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        workers, queued = int(params["workers"]), int(params["max_queue_size"])
        self.disagg = Disaggregated(None, params["language_url"], transport="grpc",
                                    chunk_rows=int(params["chunk_rows"]))
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
                x = read_inputs(pb_utils, request, (*INPUTS, *TRTLLM_OPTIONAL_INPUTS))  # here, not in the worker
                req = Qwen3VLRequest.from_arrays(x)
                # end_id: the language server's checkpoint is not read here, so none is taken
                parse_options(x, req.max_tokens, min_tokens=False)
                if not self.slots.acquire(blocking=False):
                    raise Unavailable(f"{QUEUE_SIZE} ({self.max_queue_size} requests wait for a worker)")
                self.pool.submit(self._run, sender, req)
            except Exception as exc:
                sender.send(error_response(pb_utils, exc, pb_utils.Logger), flags=FINAL)
        return None

    def _encode(self, req: Qwen3VLRequest) -> Encoded:
        inputs = [pb_utils.Tensor(name, value) for name, value in req.arrays(encode_only=True).items()]
        response = pb_utils.InferenceRequest(model_name=ENCODE_MODEL, inputs=inputs,
                                             requested_output_names=list(ENCODE_OUTPUTS)).exec()
        if response.has_error():
            raise RemoteError(response.error().message())  # passed on as it came
        out = {n: as_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in ENCODE_OUTPUTS}
        table = out[ENCODE_OUTPUTS[1]]
        return Encoded.from_outputs(out.get, table.shape, table.dtype)

    def _run(self, sender, req: Qwen3VLRequest):
        try:
            self.work.start()
            sampling = {k: getattr(req, k) for k in ("temperature", "top_k", "top_p", "seed")
                        if getattr(req, k) is not None}
            pieces, cancelled = [], CancelPoll(sender.is_cancelled, self.cancel_check_seconds)
            for text in self.disagg.run(self._encode(req), req.max_tokens, **sampling):
                if self.stop_watch.stopping.is_set():
                    raise Unavailable(STOPPING)
                if req.stream and not cancelled():
                    _send_text(sender, text)
                pieces.append(text)
            if req.stream:
                sender.send(flags=FINAL)
            else:
                _send_text(sender, "".join(pieces), FINAL)
        except Exception as exc:  # noqa: BLE001 -- the request fails alone; the server's own error as it came
            sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)
        finally:
            self.work.finish()
            self.slots.release()

    def finalize(self):
        self.stop_watch.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.disagg.close()
        exit_stub()
