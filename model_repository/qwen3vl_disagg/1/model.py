"""qwen3vl_disagg: the disaggregated request driven from the encoder host (BLS + the package's sender),
with the `qwen3vl` interface.

One `Disaggregated` per model instance, made in `initialize`: its pool of language servers (one
channel and stream each) serves every request (from the worker pool's threads). The language
server streams token ids; the text, stop strings and finish reason come from the same `TextStream`
the single server's postprocessing uses, over this server's copy of the tokenizer, so a sequence
that moves to another language server (transfer/sender.py) goes on as one stream. A request whose
client goes away, or that meets a stop string, ends its sequence, which stops its generation."""

import threading
import uuid

import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import scalar
from qwen3vl_triton.backend.lifecycle import STOPPING, ServerStopWatch, Work, exit_stub
from qwen3vl_triton.backend.responses import error, error_response, qwen3vl_outputs, send_response
from qwen3vl_triton.backend.tensors import as_numpy, model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.clients.qwen3vl import ENCODE_MODEL, INPUTS, Qwen3VLRequest
from qwen3vl_triton.contract import ENCODE_OUTPUTS, FinishReason
from qwen3vl_triton.errors import QUEUE_SIZE, RemoteError, Unavailable
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.text import untrusted
from qwen3vl_triton.text.detok import TextStream
from qwen3vl_triton.text.preprocess import TRTLLM_OPTIONAL_INPUTS, parse_options
from qwen3vl_triton.transfer.pool import conversation_key
from qwen3vl_triton.transfer.sender import Disaggregated, Encoded

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        workers, queued = int(params["workers"]), int(params["max_queue_size"])
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.family = pb_utils.MetricFamily("qwen3vl_migrations_total",
                                            "sequences moved to another language server after theirs failed",
                                            pb_utils.MetricFamily.COUNTER)
        self.migrations = self.family.Metric(labels=labels)
        self._metric_lock = threading.Lock()  # the stub crashes on metric calls from two threads at once
        self.disagg = Disaggregated(None, params["language_urls"], transport="grpc",
                                    chunk_rows=int(params["chunk_rows"]),
                                    migration_limit=int(params["migration_limit"]), on_migrate=self._migrated)
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
                # read here, not in the worker
                x = read_inputs(pb_utils, request, (*INPUTS, *TRTLLM_OPTIONAL_INPUTS, "conversation_id"))
                req = Qwen3VLRequest.from_arrays(x)
                # end_id: the language server's checkpoint is not read here, so none is taken
                parse_options(x, req.max_tokens, min_tokens=False)
                req.stop = [untrusted.text(s, f"stop_words[{i}]") for i, s in enumerate(req.stop)]
                key = conversation_key(scalar(x, "conversation_id", untrusted_id), req.messages, req.prompt,
                                       req.images)
                if not self.slots.acquire(blocking=False):
                    raise Unavailable(f"{QUEUE_SIZE} ({self.max_queue_size} requests wait for a worker)")
                self.pool.submit(self._run, sender, req, key)
            except Exception as exc:
                sender.send(error_response(pb_utils, exc, pb_utils.Logger), flags=FINAL)
        return None

    def _migrated(self):
        with self._metric_lock:
            self.migrations.increment(1)

    def _encode(self, req: Qwen3VLRequest) -> Encoded:
        inputs = [pb_utils.Tensor(name, value) for name, value in req.arrays(encode_only=True).items()]
        response = pb_utils.InferenceRequest(model_name=ENCODE_MODEL, inputs=inputs,
                                             requested_output_names=list(ENCODE_OUTPUTS)).exec()
        if response.has_error():
            raise RemoteError(response.error().message())  # passed on as it came
        out = {n: as_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in ENCODE_OUTPUTS}
        table = out[ENCODE_OUTPUTS[1]]
        return Encoded.from_outputs(out.get, table.shape, table.dtype)

    def _run(self, sender, req: Qwen3VLRequest, key: bytes):
        rid = uuid.uuid4().hex
        pieces = None
        try:
            self.work.start()
            sampling = {k: getattr(req, k) for k in ("temperature", "top_k", "top_p", "seed")
                        if getattr(req, k) is not None}
            stream = TextStream(self.tokenizer, self.spec.end_ids, req.max_tokens, req.stop)
            enc = self._encode(req)
            stream.prompt_tokens = int(enc.input_ids.size)

            def respond(text, ids, flags=0):
                send_response(pb_utils, sender,
                              qwen3vl_outputs(pb_utils, text, ids, stream.prompt_tokens, stream.finish, rid), flags)

            cancelled = CancelPoll(sender.is_cancelled, self.cancel_check_seconds)
            texts, all_ids = [], []
            pieces = self.disagg.tokens(enc, req.max_tokens, key, **sampling)
            for _, out in pieces:
                if self.stop_watch.stopping.is_set():
                    raise Unavailable(STOPPING)
                if cancelled():  # the client left: closing `pieces` ends the sequence and its generation
                    sender.send(flags=FINAL)
                    return
                before = len(stream.ids)
                text, finish = stream.add(out)
                ids = stream.ids[before:]
                if req.stream:
                    if text or ids or finish:
                        respond(text, ids, FINAL if finish else 0)
                else:
                    texts.append(text)
                    all_ids.extend(ids)
                if finish:  # an end id or a stop string: the generation is stopped below
                    break
            if stream.finish is None:  # the language server ended first (its context limit)
                texts.append(stream.close(FinishReason.LENGTH))
                if req.stream:
                    respond(texts[-1], [], FINAL)
            if not req.stream:
                respond("".join(texts), all_ids, FINAL)
        except Exception as exc:  # noqa: BLE001 -- the request fails alone; the server's own error as it came
            sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)
        finally:
            if pieces is not None:
                pieces.close()  # ends the sequence on its language server (stopping a generation still running)
            self.work.finish()
            self.slots.release()

    def finalize(self):
        self.stop_watch.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.disagg.close()
        self.migrations = None  # each Metric before its MetricFamily, or the stub crashes on exit
        self.family = None
        exit_stub()


def untrusted_id(value) -> str:
    return untrusted.text(value, "conversation_id")
