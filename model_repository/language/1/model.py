"""language: resumable table transfer into sequence state, then generation on tensorrt_llm.

Every input is read here in `execute`; generation threads get plain values and the response
sender only. State lives in the package's SequenceStore (bounded, expiring on the sequence
batcher's idle clock, never while generating); see docs/design.md §5 for the ops and
qwen3vl_triton/transfer/receiver.py for a sequence's phases.
"""

import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_triton.arrays import numpy_dtype, scalar, single_sequence
from qwen3vl_triton.backend.lifecycle import exit_stub
from qwen3vl_triton.backend.metrics import Gauges
from qwen3vl_triton.backend.responses import error_response, send_response
from qwen3vl_triton.backend.tensors import model_params, read_inputs
from qwen3vl_triton.backend.workers import CancelPoll
from qwen3vl_triton.clients.llm import LLMConnection, server_grpc_url
from qwen3vl_triton.contract import ENCODE_OUTPUTS, LLMRequest, SamplingParams
from qwen3vl_triton.errors import Failed, InputError, Unavailable
from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.transfer.receiver import DRAIN_FILE, OPS, Listener, RowsRefused, SequenceStore
from qwen3vl_triton.transfer.region import SharedRegions

# `start` takes the encoder's outputs under their own names (the table as its row count, table_rows)
IDS, _, ROWS, COS_SIN, DELTA, EXTRA = ENCODE_OUTPUTS
INPUTS = ("op", IDS, "table_rows", ROWS, COS_SIN, DELTA, EXTRA, "max_tokens", "temperature", "top_k", "top_p", "seed",
          "chunk", "chunk_offset", "chunk_region", "region_secret", "region_offset", "chunk_rows", "from_token",
          "prior_ids", "reuse_rows")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START, END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _load_response(store):
    sequences, tokens = store.load()
    return [pb_utils.Tensor("open_sequences", np.array([[sequences]], np.int32)),
            pb_utils.Tensor("open_tokens", np.array([[tokens]], np.int64)),
            pb_utils.Tensor("draining", np.array([[store.draining]], bool))]


def _rows_response(received, missing=()):
    """received_rows, and after a start that found rows in the row cache, `missing_rows`: the ranges
    (first row, count) still to send, flattened."""
    out = [pb_utils.Tensor("received_rows", np.array([[received]], np.int32))]
    if missing:
        out.append(pb_utils.Tensor("missing_rows", np.asarray(missing, np.int32).reshape(1, -1)))
    return out


def _text(name):
    def read(value):
        if not isinstance(value, bytes):
            return str(value)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(name, "must be UTF-8 text") from None
    return read


def _op(value):
    op = _text("op")(value)
    if op not in OPS:
        raise InputError("op", f"must be one of {', '.join(OPS)}, got {op!r}")
    return op


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = model_params(args)
        self.spec = ModelSpec.load(params["checkpoint"])
        self.tokenizer = AutoTokenizer.from_pretrained(params["checkpoint"])
        self.cancel_check_seconds = int(params["cancellation_check_period_ms"]) / 1e3
        self.store = SequenceStore(self.spec.hidden_size, numpy_dtype(params["table_dtype"]),
                                   max_bytes=int(params["state_bytes"]),
                                   idle_seconds=int(params["sequence_idle_us"]) / 1e6,
                                   vocab_size=self.spec.vocab_size, levels=self.spec.deepstack_levels,
                                   max_sequences=int(params["max_sequences"]),
                                   max_positions=self.spec.max_position_embeddings, rotary_dim=self.spec.rotary_dim,
                                   max_output_len=int(params["max_output_len"]),
                                   row_cache_bytes=int(params["row_cache_bytes"]))
        self.regions = SharedRegions()
        self.drain_file = os.path.join(args["model_repository"], DRAIN_FILE)
        self.llm = LLMConnection(server_grpc_url(), at_load=True)  # one channel, shared by every sequence
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.families = {
            name: pb_utils.MetricFamily(f"qwen3vl_language_{name}", text, kind) for name, text, kind in (
                ("sequences", "open sequences", pb_utils.MetricFamily.GAUGE),
                ("state_bytes", "bytes of sequence state", pb_utils.MetricFamily.GAUGE),
                ("regions", "shared-memory regions open for sequences", pb_utils.MetricFamily.GAUGE),
                ("prefills_total", "generations started (each prefills its prompt once)",
                 pb_utils.MetricFamily.COUNTER),
                ("sequences_started_total", "sequences started (op=start accepted)",
                 pb_utils.MetricFamily.COUNTER),
                ("rows_skipped_total", "table rows not sent because the server held them (its row cache)",
                 pb_utils.MetricFamily.COUNTER),
                ("row_cache_bytes", "bytes of image rows kept for later sequences (language_row_cache_bytes)",
                 pb_utils.MetricFamily.GAUGE))}
        self.metrics = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        self.gauges, self._gauge_lock = Gauges(self.metrics), threading.Lock()
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._expire_loop, daemon=True)
        self._janitor.start()

    # -- housekeeping ------------------------------------------------------------------------------
    def _expire_loop(self):
        while not self._stop.wait(0.5):
            self.store.expire()
            if not self.store.draining and os.path.exists(self.drain_file):
                self.store.draining = True  # the server stops soon: new sequences go elsewhere
                pb_utils.Logger.log_info("language: draining (no new sequence; the open ones go on)")
            self._update_gauges()

    def _update_gauges(self):
        """Send the gauges that changed: each update is a round trip to the server, and a chunk
        request changes neither."""
        with self._gauge_lock:  # the janitor thread updates them too
            self.gauges.set("sequences", len(self.store))
            self.gauges.set("state_bytes", self.store.bytes_held)
            self.gauges.set("regions", len(self.regions))
            self.gauges.set("row_cache_bytes", self.store.row_cache.bytes)

    # -- requests ------------------------------------------------------------------------------------
    def execute(self, requests):
        self.store.expire()
        for request in requests:
            sender = request.get_response_sender()
            corrid = request.correlation_id()
            flags = request.flags()
            end_now = bool(flags & END)  # Triton ends the sequence after this request: so does the model
            try:
                x = read_inputs(pb_utils, request, INPUTS)
                op = scalar(x, "op", _op, required=True)
                if (op in ("start", "load")) != bool(flags & START):
                    raise InputError("op", "a sequence begins with op=start carrying the sequence START flag"
                                     if op not in ("start", "load") else f"op={op} must carry the sequence START flag")
                if op == "load":  # a one-request sequence (START and END): nothing is held
                    send_response(pb_utils, sender, _load_response(self.store), FINAL)
                elif op == "generate":  # with END, the id is free at once; the sequence ends with its generation
                    self._generate(sender, corrid, x, release_when_done=end_now)
                    if end_now:
                        self.store.free_id(corrid)
                    end_now = False
                else:
                    send_response(pb_utils, sender, self._control(op, corrid, x), FINAL)
            except RowsRefused as exc:  # received_rows as data first, then the error for people
                send_response(pb_utils, sender, _rows_response(exc.received_rows))
                sender.send(error_response(pb_utils, exc), flags=FINAL)
            except (InputError, Unavailable) as exc:
                sender.send(error_response(pb_utils, exc), flags=FINAL)
            except Exception as exc:  # an internal failure frees the sequence
                end_now = True
                sender.send(error_response(pb_utils, exc, pb_utils.Logger), flags=FINAL)
            if end_now:
                self._end(corrid, f"generation cancelled: sequence {corrid} got the END flag")
        self._update_gauges()
        return None

    def _end(self, corrid, reason):
        generation = self.store.end(corrid, reason)
        if generation is not None:
            self._stop_generation(generation)

    def _control(self, op, corrid, x):
        if op == "start":
            ids, cos_sin, delta = single_sequence(x, IDS), x.get(COS_SIN), scalar(x, DELTA, int, default=0)
            prior = np.zeros(0, np.int64)
            cos_sin = None if cos_sin is None else single_sequence(x, COS_SIN)
            extra = None if x.get(EXTRA) is None else single_sequence(x, EXTRA).reshape(-1)
            if x.get("prior_ids") is not None:  # a generation moved here: its tokens so far join the prompt
                prior = single_sequence(x, "prior_ids").astype(np.int64)
                if prior.size and not ((prior >= 0) & (prior < self.spec.vocab_size)).all():
                    raise InputError("prior_ids", f"must be token ids in [0, {self.spec.vocab_size})")
                cos_sin = mrope.continue_cos_sin(cos_sin, self.spec, ids.size, delta, prior.size)
                ids = np.concatenate([np.asarray(ids).reshape(-1), prior]).astype(np.int32)
                if extra is not None and extra.size == ids.size - prior.size:  # the moved tokens are text: id 0
                    extra = np.concatenate([extra, np.zeros(prior.size, extra.dtype)])
            seq = self.store.start(
                corrid,
                input_ids=ids,
                table_rows=scalar(x, "table_rows", int, required=True),
                prompt_vocab_size=scalar(x, ROWS, int),
                mrope_cos_sin=cos_sin,
                mrope_delta=delta,
                extra_ids=extra,
                max_tokens=scalar(x, "max_tokens", int, required=True),
                sampling=SamplingParams(temperature=scalar(x, "temperature", float, default=0.0),
                                        top_k=scalar(x, "top_k", int, default=0),
                                        top_p=scalar(x, "top_p", float, default=1.0),
                                        seed=scalar(x, "seed", int)),
                prior=prior.size,
                reuse_rows=scalar(x, "reuse_rows", bool, default=False),
            )
            skipped = 0 if seq.held is None else int(seq.held.sum())
            with self._gauge_lock:  # the janitor thread sends the gauges: one metric call at a time
                self.metrics["sequences_started_total"].increment(1)
                if skipped:
                    self.metrics["rows_skipped_total"].increment(skipped)
            # the ranges to send only when the row cache filled some: else every row from received_rows
            return _rows_response(seq.received, seq.missing() if skipped else ())
        if op == "chunk":
            offset = scalar(x, "chunk_offset", int, required=True)
            if x.get("chunk_region") is not None:  # co-located sender: rows read from its region
                return _rows_response(self.store.chunk_from_region(
                    corrid, offset, scalar(x, "chunk_rows", int, required=True), self.regions,
                    scalar(x, "chunk_region", _text("chunk_region"), required=True),
                    scalar(x, "region_secret", _text("region_secret"), required=True),
                    scalar(x, "region_offset", int, required=True)))
            return _rows_response(self.store.chunk(corrid, offset, single_sequence(x, "chunk")))
        return _rows_response(self.store.status(corrid).received)

    def _generate(self, sender, corrid, x, release_when_done):
        from_token = scalar(x, "from_token", int, default=0)
        seq = self.store.get(corrid)

        def send(text, ids, final):
            send_response(pb_utils, sender, [
                pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("output_ids", np.asarray(ids, np.int32).reshape(1, -1)),
            ], FINAL if final else 0)

        def fail(message):
            sender.send(error_response(pb_utils, Failed(message)), flags=FINAL)

        listener = Listener(send, fail, CancelPoll(sender.is_cancelled, self.cancel_check_seconds), self.tokenizer)
        if seq.generate(listener, from_token, release_when_done):
            self.metrics["prefills_total"].increment(1)
            threading.Thread(target=self._run, args=(seq,), daemon=True).start()
        elif not seq.open:
            self.store.release(seq)

    def _run(self, seq):
        """Stream the LLM's tokens into the sequence state (one tensorrt_llm request per sequence,
        over the server's own gRPC endpoint: see qwen3vl_triton/clients/llm.py). Once the sequence
        has ended (END flag), the LLM request is stopped and what it still sends is dropped."""
        request = LLMRequest(seq.input_ids, seq.max_tokens, end_id=self.spec.end_id, pad_id=self.spec.pad_id,
                             stop_ids=self.spec.end_ids,  # generation ends at any end id
                             table=seq.table, mrope_cos_sin=seq.mrope_cos_sin, mrope_delta=seq.mrope_delta,
                             extra_ids=seq.extra_ids, sampling=seq.sampling, streaming=True)
        if not seq.open:  # ended before the LLM was asked
            return
        stopped = False
        try:
            for ids in self.llm.generate(request, seq.generation_id):
                if not seq.open:  # END came while the request was on its way: stop it (again)
                    if not stopped:
                        self._stop_generation(seq.generation_id)
                        stopped = True
                    continue
                seq.record(ids.tolist(), final=False)
            seq.record([], final=True)
        except Exception as exc:
            seq.record([], final=True, error=f"generation failed: {exc}")
        if not seq.open:
            self.store.release(seq)
        self._update_gauges()

    def _stop_generation(self, generation_id):
        """Cancel a running tensorrt_llm request the way the tensorrtllm backend does: a request
        with `stop` set and the same request id."""
        try:
            self.llm.stop(generation_id)
        except Exception as exc:  # the sequence is released regardless; the LLM ends at max_tokens
            pb_utils.Logger.log_warn(f"stopping generation {generation_id}: {exc}")

    def finalize(self):
        self._stop.set()
        self._janitor.join(timeout=5)
        self.llm.close()
        self.metrics.clear()  # each Metric before its MetricFamily, or the stub crashes on exit
        self.families.clear()
        exit_stub()  # backend/lifecycle.py: what CPython's own shutdown would cost
