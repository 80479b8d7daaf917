"""postprocessing: runs one request's generation on `tensorrt_llm` (streamed, over the server's
own gRPC endpoint: see qwen3vl_triton/clients/llm.py for why not BLS) and turns its token ids into
text, with stop strings and the finish reason.

Every request has its own detokenizer in its own worker, so no stream state is keyed by anything
a client chooses. The `tensorrt_llm` request gets a random id; a client that goes away (seen
within the cancellation period) or a stop string ends the generation with a `stop` request for
that id, as the tensorrtllm backend cancels."""

import uuid

import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import scalar
from qwen3vl_triton.backend.lifecycle import exit_stub
from qwen3vl_triton.backend.responses import error, qwen3vl_outputs, send_response
from qwen3vl_triton.backend.tensors import model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll, worker_pool
from qwen3vl_triton.clients.llm import LLMConnection, server_grpc_url
from qwen3vl_triton.contract import LLM_INPUT_NAMES, FinishReason, LLMRequest
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.text import untrusted
from qwen3vl_triton.text.detok import TextStream

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        self.llm = LLMConnection(server_grpc_url(), at_load=True)  # one channel, shared by every request
        self.pool = worker_pool(int(params["workers"]), "generate")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                # read here, not in the worker (a bfloat16 table through DLPack); forwarded with `streaming`
                # set always (stop strings, cancelling)
                x = read_inputs(pb_utils, request, (*LLM_INPUT_NAMES, "stream", "stop_words"))
                given = {to: x[name] for name, to in LLM_INPUT_NAMES.items() if x[name] is not None}
                llm = LLMRequest.from_arrays(given)
                llm.streaming = True
                stops = [] if x["stop_words"] is None else [
                    untrusted.text(s, f"stop_words[{i}]") for i, s in enumerate(x["stop_words"].reshape(-1))]
                stream = TextStream(self.tokenizer, self.spec.end_ids, llm.max_new_tokens, stops)
                stream.prompt_tokens = len(llm.input_ids)
                self.pool.submit(self._run, sender, llm, stream, scalar(x, "stream", bool, default=False))
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)
        return None

    def _respond(self, sender, rid: str, stream: TextStream, text: str, ids: list[int], flags: int = 0) -> None:
        send_response(pb_utils, sender, qwen3vl_outputs(pb_utils, text, ids, stream.prompt_tokens, stream.finish, rid),
                      flags)

    def _run(self, sender, llm: LLMRequest, stream: TextStream, streaming: bool) -> None:
        rid = uuid.uuid4().hex
        cancelled = CancelPoll(sender.is_cancelled, self.cancel_check_seconds)
        pieces, all_ids, stopped = [], [], False
        try:
            generation = self.llm.generate(llm, rid)
            for out in generation:
                if stream.finish is not None or stopped:
                    if not stopped:  # an end id the engine does not stop at: it would go on
                        self.llm.stop(rid, quiet=True)
                        stopped = True
                    continue  # what the engine still sends is dropped
                if cancelled():
                    generation.close()  # a generation left early is stopped
                    sender.send(flags=FINAL)
                    return
                if out.size == 0:
                    continue
                before = len(stream.ids)
                text, finish = stream.add(out.tolist())
                ids = stream.ids[before:]
                if stream.stopped_by_string:
                    self.llm.stop(rid, quiet=True)  # the engine would go on
                    stopped = True
                if streaming:
                    self._respond(sender, rid, stream, text, ids, FINAL if finish else 0)
                else:
                    pieces.append(text)
                    all_ids.extend(ids)
                    if finish:
                        self._respond(sender, rid, stream, "".join(pieces), all_ids, FINAL)
            if stream.finish is None:  # the engine ended first (e.g. at its context limit)
                text = stream.close(FinishReason.LENGTH)
                self._respond(sender, rid, stream, text if streaming else "".join(pieces) + text,
                              [] if streaming else all_ids, FINAL)
        except Exception as exc:  # noqa: BLE001 -- the request fails alone, with a message (tensorrt_llm's
            # own error passed on as it came)
            sender.send(pb_utils.InferenceResponse(error=error(pb_utils, exc, pb_utils.Logger)), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.llm.close()
        exit_stub()  # backend/lifecycle.py: what CPython's own shutdown would cost
