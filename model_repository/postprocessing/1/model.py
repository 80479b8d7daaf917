"""postprocessing: runs one request's generation on `tensorrt_llm` (streamed, over the server's
own gRPC endpoint: see qwen3vl_triton/clients/llm.py for why not BLS) and turns its token ids into
text, with stop strings and the finish reason.

Every request has its own detokenizer in its own worker, so no stream state is keyed by anything
a client chooses. The `tensorrt_llm` request gets a random id; a client that goes away (seen
within the cancellation period) or a stop string ends the generation with a `stop` request for
that id, as the tensorrtllm backend cancels."""

import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import scalar
from qwen3vl_triton.backend.lifecycle import exit_stub
from qwen3vl_triton.backend.responses import error, send_response
from qwen3vl_triton.backend.tensors import as_numpy, model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.clients import llm as llm_client
from qwen3vl_triton.clients.grpc_stream import StreamError
from qwen3vl_triton.contract import LLM_INPUT_NAMES
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.text import untrusted
from qwen3vl_triton.text.detok import TextStream

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TO_LLM = LLM_INPUT_NAMES  # this model's input -> tensorrt_llm's input


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        self.llm_url = llm_client.server_grpc_url()
        self.pool = worker_pool(int(params["workers"]), "generate")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                # read here, not in the worker (a bfloat16 table through DLPack)
                llm = {TO_LLM[k]: as_numpy(t) for k, t in
                       ((k, pb_utils.get_input_tensor_by_name(request, k)) for k in TO_LLM) if t is not None}
                x = read_inputs(pb_utils, request, ("input_lengths", "request_output_len", "stream", "stop_words"))
                stops = [] if x["stop_words"] is None else [
                    untrusted.text(s, f"stop_words[{i}]") for i, s in enumerate(x["stop_words"].reshape(-1))]
                stream = TextStream(self.tokenizer, self.spec.end_ids,
                                    scalar(x, "request_output_len", int, required=True), stops)
                stream.prompt_tokens = scalar(x, "input_lengths", int, required=True)
                self.pool.submit(self._run, sender, llm, stream, scalar(x, "stream", bool, default=False))
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)
        return None

    def _respond(self, sender, rid: str, stream: TextStream, text: str, ids: list[int], flags: int = 0) -> None:
        send_response(pb_utils, sender, [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_)),
            pb_utils.Tensor("output_ids", np.asarray(ids, np.int32).reshape(1, -1)),
            pb_utils.Tensor("prompt_tokens", np.array([[stream.prompt_tokens]], np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[(stream.finish or "").encode()]], np.object_)),
            pb_utils.Tensor("generation_id", np.array([[rid.encode()]], np.object_)),
        ], flags)

    def _stop(self, rid: str) -> None:
        """End the `tensorrt_llm` request `rid` (the tensorrtllm backend's `stop` input)."""
        llm_client.stop(self.llm_url, rid)

    def _run(self, sender, inputs: dict, stream: TextStream, streaming: bool) -> None:
        rid = uuid.uuid4().hex
        inputs = {**inputs, "streaming": np.ones((1, 1), bool)}  # always: stop strings, cancelling
        cancelled = CancelPoll(sender.is_cancelled, self.cancel_check_seconds)
        pieces, all_ids, stopped = [], [], False
        try:
            for out in llm_client.generate(self.llm_url, inputs, rid):
                if stream.finish is not None or stopped:
                    if not stopped:  # an end id the engine does not stop at: it would go on
                        self._stop(rid)
                        stopped = True
                    continue  # what the engine still sends is dropped
                if cancelled():
                    self._stop(rid)
                    stopped = True
                    sender.send(flags=FINAL)
                    return
                if out.size == 0:
                    continue
                before = len(stream.ids)
                text, finish = stream.add(out.tolist())
                ids = stream.ids[before:]
                if stream.stopped_by_string:
                    self._stop(rid)  # the engine would go on
                    stopped = True
                if streaming:
                    self._respond(sender, rid, stream, text, ids, FINAL if finish else 0)
                else:
                    pieces.append(text)
                    all_ids.extend(ids)
                    if finish:
                        self._respond(sender, rid, stream, "".join(pieces), all_ids, FINAL)
            if stream.finish is None:  # the engine ended first (e.g. at its context limit)
                text = stream.close("length")
                self._respond(sender, rid, stream, text if streaming else "".join(pieces) + text,
                              [] if streaming else all_ids, FINAL)
        except StreamError as exc:  # tensorrt_llm's own error, passed on as it is
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 -- the request fails alone, with a message
            sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        exit_stub()  # backend/lifecycle.py: what CPython's own shutdown would cost
