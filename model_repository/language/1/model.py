"""language: resumable table transfer into sequence state, then generation through tensorrt_llm (BLS).

Every input is read here in `execute`; generation threads get plain values and the response
sender only. State lives in the package's SequenceStore (bounded, expiring on the sequence
batcher's idle clock); see DESIGN §5 for the ops.
"""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.backend import (CancelPoll, Gauges, error_response, model_params, numpy_dtype, output_tensor,
                                    read_inputs, scalar, send_response, single_sequence)
from qwen3vl_triton.checkpoint import ModelSpec
from qwen3vl_triton.errors import InputError
from qwen3vl_triton.language import OPS, Listener, SequenceStore, SharedRegions, attach, record
from qwen3vl_triton.sampling import SamplingParams
from qwen3vl_triton.stop_words import stop_words_list

INPUTS = ("op", "input_ids", "table_rows", "prompt_vocab_size", "mrope_rotary_cos_sin", "mrope_position_deltas",
          "max_tokens", "temperature", "top_k", "top_p", "seed", "chunk", "chunk_offset", "chunk_region",
          "region_offset", "chunk_rows", "from_token")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START, END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _send_rows(sender, received):
    send_response(pb_utils, sender, [pb_utils.Tensor("received_rows", np.array([[received]], np.int32))], FINAL)


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.max_output_len = int(params["max_output_len"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        self.store = SequenceStore(self.spec.hidden_size, numpy_dtype(params["table_dtype"]),
                                   max_bytes=int(params["state_bytes"]),
                                   idle_seconds=int(params["sequence_idle_us"]) / 1e6,
                                   vocab_size=self.spec.vocab_size, levels=self.spec.deepstack_levels)
        self.regions = SharedRegions(idle_seconds=self.store.idle_seconds)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.families = {
            name: pb_utils.MetricFamily(f"qwen3vl_language_{name}", text, kind) for name, text, kind in (
                ("sequences", "sequences holding state", pb_utils.MetricFamily.GAUGE),
                ("state_bytes", "bytes of sequence state", pb_utils.MetricFamily.GAUGE),
                ("prefills_total", "generations started (each prefills its prompt once)",
                 pb_utils.MetricFamily.COUNTER))}
        self.metrics = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        self.gauges, self._gauge_lock = Gauges(self.metrics), threading.Lock()
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._expire_loop, daemon=True)
        self._janitor.start()

    # -- housekeeping ------------------------------------------------------------------------------
    def _expire_loop(self):
        while not self._stop.wait(0.5):
            self._expire()

    def _expire(self):
        self.regions.expire()
        for seq in self.store.expire():
            with seq.cond:
                seq.listener = None  # an abandoned stream: keep nothing, send nothing
        self._update_gauges()

    def _update_gauges(self):
        """Send the gauges that changed: each update is a round trip to the server, and a chunk
        request changes neither."""
        with self._gauge_lock:  # the janitor thread updates them too
            self.gauges.set("sequences", len(self.store))
            self.gauges.set("state_bytes", self.store.bytes_held)

    # -- requests ------------------------------------------------------------------------------------
    def execute(self, requests):
        self._expire()
        for request in requests:
            sender = request.get_response_sender()
            corrid = request.correlation_id()
            flags = request.flags()
            try:
                x = read_inputs(pb_utils, request, INPUTS)
                op = scalar(x, "op", lambda b: b.decode() if isinstance(b, bytes) else str(b), required=True)
                if op not in OPS:
                    raise InputError("op", f"must be one of {', '.join(OPS)}, got {op!r}")
                if (op == "start") != bool(flags & START):
                    raise InputError("op", "a sequence begins with op=start carrying the sequence START flag"
                                     if op != "start" else "op=start must carry the sequence START flag")
                if op == "generate":
                    self._generate(sender, corrid, x, end=bool(flags & END))
                    continue
                received = self._control(op, corrid, x)
                if flags & END:
                    self.store.drop(corrid)
                _send_rows(sender, received)
            except Exception as exc:
                if not isinstance(exc, InputError):  # an internal failure frees the sequence
                    self.store.drop(corrid)
                sender.send(error_response(pb_utils, exc, pb_utils.Logger), flags=FINAL)
        self._update_gauges()
        return None

    def _control(self, op, corrid, x):
        if op == "start":
            max_tokens = scalar(x, "max_tokens", int, required=True)
            if not 1 <= max_tokens <= self.max_output_len:
                raise InputError("max_tokens", f"must be in [1, {self.max_output_len}], got {max_tokens}")
            cos_sin = x.get("mrope_rotary_cos_sin")
            seq = self.store.start(
                corrid,
                input_ids=single_sequence(x, "input_ids"),
                table_rows=scalar(x, "table_rows", int, required=True),
                prompt_vocab_size=scalar(x, "prompt_vocab_size", int),
                mrope_cos_sin=None if cos_sin is None else single_sequence(x, "mrope_rotary_cos_sin"),
                mrope_delta=scalar(x, "mrope_position_deltas", int, default=0),
                max_tokens=max_tokens,
                sampling=SamplingParams(temperature=scalar(x, "temperature", float, default=0.0),
                                        top_k=scalar(x, "top_k", int, default=0),
                                        top_p=scalar(x, "top_p", float, default=1.0),
                                        seed=scalar(x, "seed", int)),
            )
            return seq.received
        if op == "chunk":
            if x.get("chunk_region") is not None:  # co-located sender: rows read in place
                rows = self.regions.rows(scalar(x, "chunk_region", lambda b: b.decode(errors="replace")),
                                         scalar(x, "region_offset", int, required=True),
                                         scalar(x, "chunk_rows", int, required=True),
                                         self.spec.hidden_size, self.store.table_dtype)
            else:
                rows = single_sequence(x, "chunk")
            return self.store.chunk(corrid, scalar(x, "chunk_offset", int, required=True), rows)
        return self.store.status(corrid).received

    def _generate(self, sender, corrid, x, end):
        from_token = scalar(x, "from_token", int, default=0)
        seq = self.store.ready_to_generate(corrid, from_token)

        def send(text, ids, final):
            send_response(pb_utils, sender, [
                pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("output_ids", np.asarray(ids, np.int32).reshape(1, -1)),
            ], FINAL if final else 0)

        def fail(message):
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

        listener = Listener(send, fail, CancelPoll(sender.is_cancelled, self.cancel_check_seconds), self.tokenizer,
                            seq.tokens[:from_token])
        seq.end_requested = seq.end_requested or end
        if attach(seq, listener, from_token):
            self.metrics["prefills_total"].increment(1)
            threading.Thread(target=self._run, args=(seq,), daemon=True).start()
        elif seq.done and seq.end_requested:
            self.store.drop(corrid)

    def _run(self, seq):
        """Stream the LLM's tokens into the sequence state (one tensorrt_llm request per sequence)."""
        s = seq.sampling
        tensors = {
            "input_ids": seq.input_ids[None],
            "input_lengths": np.array([[seq.input_ids.size]], np.int32),
            "request_output_len": np.array([[seq.max_tokens]], np.int32),
            "end_id": np.array([[self.spec.end_id]], np.int32),
            "pad_id": np.array([[self.spec.pad_id]], np.int32),
            "stop_words_list": stop_words_list(self.spec.end_ids),  # generation ends at any end id
            "streaming": np.array([[True]]),
            "temperature": np.array([[s.temperature]], np.float32),
            "runtime_top_k": np.array([[s.top_k]], np.int32),
            "runtime_top_p": np.array([[s.top_p]], np.float32),
            "prompt_embedding_table": seq.table[None],
            "prompt_vocab_size": np.array([[seq.rows]], np.int32),
            "mrope_position_deltas": np.array([[seq.mrope_delta]], np.int64),
        }
        if s.seed is not None:
            tensors["seed"] = np.array([[s.seed]], np.uint64)
        if seq.mrope_cos_sin is not None:
            tensors["mrope_rotary_cos_sin"] = seq.mrope_cos_sin[None]
        request = pb_utils.InferenceRequest(
            model_name="tensorrt_llm", requested_output_names=["output_ids"],
            inputs=[output_tensor(pb_utils, k, v) for k, v in tensors.items()])
        try:
            for response in request.exec(decoupled=True):
                if response.has_error():
                    raise RuntimeError(response.error().message())
                out = pb_utils.get_output_tensor_by_name(response, "output_ids")
                if out is not None:
                    record(seq, out.as_numpy().reshape(-1).tolist(), final=False)
            record(seq, [], final=True)
        except Exception as exc:
            record(seq, [], final=True, error=f"generation failed: {exc}")
            self.store.drop(seq.corrid)
        if seq.end_requested:
            self.store.drop(seq.corrid)

    def finalize(self):
        self._stop.set()
        self._janitor.join(timeout=5)
        self.regions.close()
        self.metrics.clear()  # each Metric before its MetricFamily, or the stub crashes on exit
        self.families.clear()
