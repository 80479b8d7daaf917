"""Disaggregated serving, client side: encode on the encoder server, move the table to the
language server in resumable chunks, then stream the generation (docs/design.md §5).

The same classes serve the CLI (`python -m client disagg`), library users, and a BLS model on
the encoder host (`qwen3vl_disagg`, which makes one `Disaggregated` per model instance and
reuses it for every request). How the rows travel is a `Transport` (transfer/transport.py:
gRPC payloads, system or CUDA shared memory), made once per sender.

Chunks of one sequence go out on the language client's gRPC stream, up to a window of them in
flight; the language server applies them in the order sent (send_table).
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from qwen3vl_triton.clients.grpc_stream import GrpcStream, infer_input, is_final
from qwen3vl_triton.clients.qwen3vl import ENCODE_MODEL, Qwen3VLRequest
from qwen3vl_triton.contract import ENCODE_OUTPUTS
from qwen3vl_triton.errors import RemoteError, StreamError, Unavailable, message_of
from qwen3vl_triton.transfer.transport import Transport, TransportError, make_transport


class TransferError(RemoteError):
    """A request of the disaggregated path failed; `received_rows` is set when the server sent it
    (the `received_rows` output that comes before a refusal's error). `error`: the message as
    parsed (errors.parse: code, input, text)."""

    def __init__(self, message: str, received_rows: int | None = None, status: str | None = None):
        super().__init__(message, status)
        self.received_rows = received_rows

class Held(NamedTuple):
    """What a language server holds of a sequence's table after `start`: `received` (the
    contiguous prefix) and `missing`, the ranges (first row, count) still to send -- fewer than
    the rest of the table when its row cache held some of the image rows."""

    received: int
    missing: list[tuple[int, int]]


class StreamBroken(TransferError):
    """The response stream ended before its final response (network, client cancel, timeout)."""

@dataclass
class Encoded:
    """The encoder server's output for one request."""

    input_ids: np.ndarray  # (L,) int32, image tokens as prompt-table ids
    rows: int  # prompt_vocab_size: rows of the table
    hidden: int
    mrope_cos_sin: np.ndarray
    mrope_delta: int
    table: np.ndarray | None = None  # (rows, H) when it came back in the response (grpc transport)
    extra_ids: np.ndarray | None = None  # (L,) uint64 prompt_table_extra_ids: the image rows' ids
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @property
    def table_bytes(self) -> int:
        return self.rows * self.hidden * self.dtype.itemsize

    @classmethod
    def from_outputs(cls, get, table_shape, table_dtype) -> "Encoded":
        """From the `encode` ensemble's outputs: `get(name)` gives each as numpy (the table None when
        it went to a shared-memory region), `table_shape` `[1, rows, H]` and `table_dtype` its own."""
        ids, table, rows, cos_sin, delta, extra = ENCODE_OUTPUTS
        data, extra_ids = get(table), get(extra)
        return cls(input_ids=get(ids).reshape(-1), rows=int(get(rows).reshape(-1)[0]), hidden=int(table_shape[2]),
                   mrope_cos_sin=get(cos_sin).reshape(-1), mrope_delta=int(get(delta).reshape(-1)[0]),
                   table=None if data is None else data[0], dtype=np.dtype(table_dtype),
                   extra_ids=None if extra_ids is None else extra_ids.reshape(-1))

class LanguageClient:
    """The `language` model's ops over one gRPC stream, shared by every sequence of its user (each
    request's answers are routed by request id). `client`: a url, or a tritonclient gRPC client to
    share (kept open on close). A stream that broke is replaced by `reconnect`."""

    def __init__(self, client, model: str = "language", timeout: float = 120.0):
        import tritonclient.grpc as grpcclient

        self.own = isinstance(client, str)
        self.client = grpcclient.InferenceServerClient(client) if self.own else client
        self.model, self.timeout = model, timeout
        self.stream = GrpcStream(self.client, timeout)
        self._lock = threading.Lock()

    def reconnect(self, broken: GrpcStream | None = None) -> None:
        """A new stream in place of `broken` (if it is still the current one: another thread may
        have replaced it already); the requests on the old one are cancelled."""
        with self._lock:
            if broken is not None and self.stream is not broken:
                return
            old, self.stream = self.stream, GrpcStream(self.client, self.timeout)
        old.close(cancel=True)

    def close(self, cancel: bool = False) -> None:
        try:
            self.stream.close(cancel)
        finally:
            if self.own:
                self.client.close()

    def _submit(self, inputs, stream: GrpcStream | None = None, **kw) -> tuple[GrpcStream, str]:
        """Send a request on `stream` (default: the current one, a new one if it broke); its handle:
        (stream, request id)."""
        if stream is None:
            if self.stream.broken:
                self.reconnect(self.stream)
            stream = self.stream
        try:
            return stream, stream.submit(self.model, inputs, **kw)
        except StreamError as exc:  # the stream broke under an earlier request
            raise StreamBroken(str(exc)) from None

    def _results(self, handle: tuple[GrpcStream, str]) -> Iterator:
        """The request's results; on an error, TransferError with the last `received_rows` the
        request's responses carried (a refusal sends it as data before its error)."""
        stream, rid = handle
        received = None
        try:
            for r in stream.results(rid, self.model):
                out = r.as_numpy("received_rows")
                if out is not None:
                    received = int(out.reshape(-1)[0])
                yield r
        except StreamError as exc:
            if exc.broken:
                raise StreamBroken(str(exc)) from None
            raise TransferError(str(exc), received) from None

    def _received(self, handle: tuple[GrpcStream, str]) -> int:
        return self._held(handle, 0).received

    def _held(self, handle: tuple[GrpcStream, str], rows: int) -> Held:
        """received_rows, and the ranges still to send of a table of `rows` rows: `missing_rows`
        when the server sent it, else every row from received_rows."""
        for r in list(self._results(handle)):
            out = r.as_numpy("received_rows")
            if out is not None:
                received = int(out.reshape(-1)[0])
                missing = r.as_numpy("missing_rows")
                if missing is None:
                    return Held(received, [(received, rows - received)] if rows > received else [])
                pairs = missing.reshape(-1, 2).tolist()
                if any(a < received or n < 1 or a + n > rows for a, n in pairs):
                    raise TransferError(f"{self.model} answered missing_rows {pairs} outside rows "
                                        f"[{received}, {rows})")
                return Held(received, [(a, n) for a, n in pairs])
        raise TransferError(f"{self.model} answered without received_rows")

    def _rows(self, corrid: int, inputs, start=False, end=False) -> int:
        return self._received(self._submit(inputs, sequence_id=corrid, sequence_start=start, sequence_end=end))

    @staticmethod
    def _op(name: str):
        return infer_input("op", np.array([[name.encode()]], dtype=np.object_))

    def load(self) -> tuple[int, int, bool]:
        """The server's load: (open sequences, the tokens they may still cost, draining), from a
        one-request sequence (START and END on a random id: nothing is held)."""
        handle = self._submit([self._op("load")], sequence_id=secrets.randbits(63) or 1, sequence_start=True,
                              sequence_end=True)
        for r in self._results(handle):
            sequences = r.as_numpy("open_sequences")
            if sequences is not None:
                return (int(sequences.reshape(-1)[0]), int(r.as_numpy("open_tokens").reshape(-1)[0]),
                        bool(r.as_numpy("draining").reshape(-1)[0]))
        raise TransferError(f"{self.model} answered op=load without open_sequences")

    def start(self, corrid: int, enc: Encoded, max_tokens: int, temperature=None, top_k=None, top_p=None,
              seed=None, prior_ids=(), reuse_rows: bool = True) -> Held:
        """Open the sequence; what the server holds of its table already (rows its row cache had)
        and the ranges to send. A refused start also ends it, so Triton's sequence slot is let go at
        once rather than at the idle timeout. `prior_ids`: tokens a generation of this request
        already delivered elsewhere; they join the prompt and `max_tokens` counts the rest.
        `reuse_rows` False: every row is to be sent (received_rows 0), whatever the server holds."""
        ids, _, rows, cos_sin, delta, extra = ENCODE_OUTPUTS  # `start` takes the encoder's outputs by their names
        inputs = [self._op("start"),
                  infer_input(ids, enc.input_ids.astype(np.int32)[None]),
                  infer_input("table_rows", np.array([[enc.rows]], np.int32)),
                  infer_input(rows, np.array([[enc.rows]], np.int32)),
                  infer_input(cos_sin, enc.mrope_cos_sin.astype(np.float32)[None]),
                  infer_input(delta, np.array([[enc.mrope_delta]], np.int64)),
                  infer_input("max_tokens", np.array([[max_tokens]], np.int32))]
        if enc.extra_ids is not None:  # and the rows the server holds under them: not sent again
            inputs += [infer_input(extra, np.asarray(enc.extra_ids, np.uint64)[None]),
                       infer_input("reuse_rows", np.array([[reuse_rows]], bool))]
        if len(prior_ids):
            inputs.append(infer_input("prior_ids", np.asarray(prior_ids, np.int32)[None]))
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        inputs += [infer_input(name, value) for name, value in
                   Qwen3VLRequest("", max_tokens=max_tokens, **sampling).arrays().items() if name in sampling]
        try:
            return self._held(self._submit(inputs, sequence_id=corrid, sequence_start=True), enc.rows)
        except TransferError as exc:
            # a refusal with received_rows: the id holds an open sequence, which is not ours to end
            if exc.received_rows is None:
                self.end(corrid)
            raise

    def chunk(self, corrid: int, offset: int, chunk_inputs: list) -> int:
        return self.chunk_received(self.send_chunk(corrid, offset, chunk_inputs))

    def send_chunk(self, corrid: int, offset: int, chunk_inputs: list) -> tuple[GrpcStream, str]:
        """Send a chunk without waiting for its answer (see `chunk_received`)."""
        return self._submit([self._op("chunk"), *chunk_inputs,
                             infer_input("chunk_offset", np.array([[offset]], np.int32))], sequence_id=corrid)

    def chunk_received(self, handle: tuple[GrpcStream, str]) -> int:
        """The server's received_rows after a sent chunk; TransferError carries it on a refusal."""
        return self._received(handle)

    def abandon(self, handle: tuple[GrpcStream, str]) -> None:
        """Give up on a sent chunk: its answer, if one comes, is dropped (the server still applies
        it, in order, before anything sent after it)."""
        stream, rid = handle
        stream.forget(rid)

    def status(self, corrid: int, end: bool = False) -> int:
        return self._rows(corrid, [self._op("status")], end=end)

    def end(self, corrid: int) -> None:
        """Free the sequence's state on the language server."""
        try:
            self.status(corrid, end=True)
        except TransferError:
            pass  # already gone (expired or failed): nothing is held

    def generate(self, corrid: int, from_token: int = 0, stream: GrpcStream | None = None, end: bool = False
                 ) -> Iterator[tuple[str, list[int]]]:
        """Yield (text, token ids) per response; StreamBroken if the stream ends early. `end`: send
        the END flag with it: the id is free at once (a new start on it is accepted) and the
        sequence ends with its generation."""
        inputs = [self._op("generate"), infer_input("from_token", np.array([[from_token]], np.int32))]
        finished = False
        for r in self._results(self._submit(inputs, stream, sequence_id=corrid, sequence_end=end)):
            text = r.as_numpy("text_output")
            if text is None:  # received_rows before a refusal (its error follows), or an empty final response
                continue
            finished = is_final(r)
            ids = r.as_numpy("output_ids")
            yield "".join(t.decode("utf-8") for t in text.reshape(-1)), [] if ids is None else ids.reshape(-1).tolist()
        if not finished:  # the model ends a generation with text_output on its final response, always
            raise StreamBroken(f"{self.model} ended sequence {corrid}'s stream without its last response (its "
                               "model process failed?)")

class ChunkSource:
    """The rows of one encoded request's table, as chunk request inputs of its transport."""

    def __init__(self, enc: Encoded, transport: Transport):
        self.enc, self.transport = enc, transport

    def rows(self, start: int, count: int) -> list:
        """The request inputs that carry rows [start, start + count) of the table."""
        return self.transport.chunk_inputs(self.enc, start, count)

@dataclass
class TransferStats:
    chunks: int = 0
    rows: int = 0
    payload_bytes: int = 0  # table bytes moved into the language server
    resumes: int = 0  # times the sender resynchronised from received_rows
    seconds: float = 0.0
    skipped: int = 0  # rows not sent: the language server held them (its row cache)

    def add(self, other: "TransferStats") -> None:
        for name in ("chunks", "rows", "payload_bytes", "resumes", "seconds", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

def _spans(missing, received: int, rows: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """Chunks (first row, count) of at most `chunk_rows` rows covering the `missing` ranges (None:
    every row) from `received` on."""
    for first, count in missing if missing is not None else [(received, rows - received)]:
        first, end = max(first, received), first + count
        while first < end:
            n = min(chunk_rows, end - first)
            yield first, n
            first += n


def send_table(lang: LanguageClient, corrid: int, source: ChunkSource, chunk_rows: int, received: int = 0,
               stats: TransferStats | None = None, max_resumes: int = 8, plan=None, window: int = 4,
               missing=None) -> int:
    """Send rows [received, rows) in chunks -- only those in the `missing` ranges when the server
    said which it lacks (`start`'s Held) -- and resync from the server's received_rows on refusal.

    Up to `window` chunks are in flight on the stream (the language server applies them in the
    order they were sent), so a transfer costs about one round trip plus the server's work rather
    than a round trip per chunk. After a refusal no new chunk is sent: the answers of those in
    flight are read, and the sender resumes from the last received_rows the server reported.

    `plan(start, count) -> list of (start, count)` may reorder, drop or duplicate chunks (tests
    inject faults with it); the loop still ends with every row held, or raises."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    enc = source.enc
    stats = stats or TransferStats()
    t0 = time.perf_counter()
    resumes = 0
    if missing is not None:  # start's answer: every row outside its ranges the server held already
        stats.skipped += enc.rows - sum(n for _, n in missing)
    while received < enc.rows:
        pending = collections.deque()  # (handle, rows) in the order sent
        refused: TransferError | None = None
        spans = _spans(missing, received, enc.rows, chunk_rows)  # the chunks the plan covers
        queued: collections.deque = collections.deque()  # planned chunks not sent yet
        while True:
            while refused is None and len(pending) < window:
                if not queued:
                    span = next(spans, None)
                    if span is None:
                        break
                    chunks = plan(*span) if plan else [span]
                    if not chunks:
                        raise TransferError(f"the chunk plan sends nothing from row {span[0]}", received)
                    queued.extend(chunks)
                start, n = queued.popleft()
                pending.append((lang.send_chunk(corrid, start, source.rows(start, n)), n))
            if not pending:
                break
            handle, n = pending.popleft()
            try:
                received = lang.chunk_received(handle)  # the server's word: the contiguous prefix it holds
                stats.chunks += 1
                stats.rows += n
                stats.payload_bytes += n * enc.hidden * enc.dtype.itemsize
            except TransferError as exc:
                if exc.received_rows is None:
                    for later, _ in pending:
                        lang.abandon(later)
                    raise
                refused, received = exc, exc.received_rows
        if refused is not None and received < enc.rows:
            if resumes >= max_resumes:
                raise refused
            resumes += 1
            stats.resumes += 1
    stats.seconds += time.perf_counter() - t0
    return received

class Disaggregated:
    """Encode on one server, generate on another; resumable at every stage. Made once and reused:
    its clients, streams and transport serve every request, from any number of threads.

    language_url: one `HOST:PORT`, several (a list, or comma-separated), or `dns:NAME:PORT` (the A
    records of NAME, re-resolved): a `LanguagePool` (transfer/pool.py) picks the server of each
    request by load and conversation key. `run` and `generate` move a sequence whose server fails
    (its process dies, its stream breaks, it answers UNAVAILABLE) to another one, at most
    `migration_limit` times: the rows are sent again and the tokens already delivered join the
    prompt, so the caller sees one uninterrupted stream; `on_migrate()` is called for each move.

    transport: a Transport, or its name: "grpc" (payloads), "shm" (system shared memory, co-located
    servers) or "cuda_shm" (CUDA shared memory on a GPU host). The shared-memory transports register
    their region with the servers' admin key (`admin_key`, default: see admin.default_key), and
    take one language server."""

    def __init__(self, encoder_url: str | None, language_url: "str | list[str]", transport: "str | Transport" = "grpc",
                 chunk_rows: int = 1024, region_bytes: int = 64 * 2**20, timeout: float = 120.0,
                 cuda_device: int = 0, chunk_window: int = 4, admin_key: str | None = None, migration_limit: int = 3,
                 on_migrate=None):
        """`encoder_url` None: the caller encodes (e.g. a BLS model on the encoder host) and calls `run`."""
        import tritonclient.grpc as grpcclient

        from qwen3vl_triton.transfer.pool import LanguagePool

        if chunk_rows < 1 or chunk_window < 1:
            raise ValueError(f"chunk_rows and chunk_window must be >= 1, got {chunk_rows} and {chunk_window}")
        if migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {migration_limit}")
        self.chunk_rows, self.chunk_window, self.timeout = chunk_rows, chunk_window, timeout
        self.migration_limit, self.on_migrate = migration_limit, on_migrate
        self.pool = LanguagePool(language_url, timeout=timeout)
        members = list(self.pool.members.values())
        if not isinstance(transport, str) or transport != "grpc":
            if self.pool.dns is not None or len(members) != 1:
                self.pool.close()
                raise ValueError(f"transport {getattr(transport, 'name', transport)} takes one language server "
                                 f"(shared memory is local to one host); got {language_url!r}")
        self.transport = make_transport(transport, region_bytes, admin_key, cuda_device)
        self.encoder = grpcclient.InferenceServerClient(encoder_url) if encoder_url else None
        self.language_url = language_url
        # the stage methods (transfer, stream) act on one server: the first one listed
        self.lang = members[0].lang if members else None
        self._first = self.lang
        self.stats = TransferStats()
        self._stats_lock = threading.Lock()
        try:
            if self.transport.name != "grpc":
                self.transport.attach(self.encoder, self.lang.client if language_url != encoder_url else None)
        except (TransportError, ValueError) as exc:
            self.close()
            raise TransferError(str(exc)) if isinstance(exc, TransportError) else exc from None

    @property
    def region(self) -> str | None:
        """The shared-memory region's name in Triton (None for the gRPC transport)."""
        return getattr(self.transport, "region", None)

    @property
    def shm_key(self) -> str | None:
        """The shared-memory region's key (None for the gRPC transport)."""
        return getattr(self.transport, "key", None)

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            if self.lang is not None and self.lang is not self._first:  # one its user put in place
                self.lang.close()
            self.pool.close()
            if self.encoder is not None:
                self.encoder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- stages ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | None, images=(), max_tokens: int = 128, messages=None, videos=()) -> Encoded:
        """`prompt` + `images` + `videos`, or `messages` (OpenAI chat messages, a list or its JSON text).
        With a shared-memory transport the table goes to its region: hold `transport.hold()` until sent."""
        import tritonclient.grpc as grpcclient

        request = Qwen3VLRequest(prompt, images, max_tokens, messages=messages, videos=videos)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ENCODE_OUTPUTS]
        self.transport.table_output(outputs[1])  # where the encoder writes the table
        try:
            result = self.encoder.infer(ENCODE_MODEL, request.grpc_inputs(encode_only=True), outputs=outputs,
                                        client_timeout=self.timeout)
        except Exception as exc:
            raise TransferError(message_of(exc), status=getattr(exc, "status", lambda: None)()) from None
        from tritonclient.utils import triton_to_np_dtype

        meta = result.get_output(ENCODE_OUTPUTS[1])
        in_response = self.transport.table_in_response
        return Encoded.from_outputs(lambda name: result.as_numpy(name) if in_response or name != meta.name else None,
                                    meta.shape, triton_to_np_dtype(meta.datatype))

    def source(self, enc: Encoded) -> ChunkSource:
        return ChunkSource(enc, self.transport)

    def transfer(self, corrid: int, enc: Encoded, max_tokens: int, resume: bool = False, plan=None,
                 **sampling) -> int:
        """Start the sequence (or, with `resume`, ask its status) and send the missing rows."""
        if resume:
            received, missing = self.lang.status(corrid), None
        else:
            received, missing = self.lang.start(corrid, enc, max_tokens, **sampling)
        stats = TransferStats()
        try:
            return send_table(self.lang, corrid, self.source(enc), self.chunk_rows, received, stats, plan=plan,
                              window=self.chunk_window, missing=missing)
        finally:
            with self._stats_lock:
                self.stats.add(stats)

    def stream(self, corrid: int, from_token: int = 0, retries: int = 3) -> Iterator[tuple[str, list[int]]]:
        """Generated (text, ids) from `from_token`; a broken stream is resumed where it stopped (on a new
        one when the shared stream itself broke)."""
        received = from_token
        for attempt in range(retries + 1):
            stream = self.lang.stream
            try:
                for text, ids in self.lang.generate(corrid, received, stream):
                    received += len(ids)
                    yield text, ids
                return
            except StreamBroken:
                if attempt == retries:
                    raise
                if stream.broken:  # else it timed out: the next `generate` takes the sequence over
                    self.lang.reconnect(stream)

    def tokens(self, enc: Encoded, max_tokens: int, key: bytes = b"", sequence_id: int | None = None,
               rows_kept: bool = True, **sampling) -> Iterator[tuple[str, list[int]]]:
        """Transfer an encoded request to a language server of the pool and stream its (text, ids);
        a server that fails hands the sequence to another (see the class). Closing the iterator
        early ends the sequence, which stops its generation. `rows_kept` False: the table's rows
        can be sent only until the first piece (a shared region reused by the next request)."""
        delivered: list[int] = []
        avoid: list = []
        moves = 0
        corrid = sequence_id or secrets.randbits(63) or 1
        while True:
            try:
                member = self.pool.choose(key, avoid)
            except Unavailable as exc:
                member, failure = None, TransferError(str(exc), status="StatusCode.UNAVAILABLE")
            else:
                failure = None
                try:
                    for text, ids in self._on(member, corrid, enc, max_tokens, delivered, sampling, key):
                        delivered.extend(ids)
                        yield text, ids
                    return
                except TransferError as exc:
                    if not _movable(exc) or (delivered and not rows_kept):
                        raise
                    failure = exc
                    self.pool.failed(member, str(exc))
            moves += 1
            if moves > self.migration_limit or len(delivered) >= max_tokens:
                if len(delivered) >= max_tokens:  # every token arrived; only the end was lost
                    return
                raise TransferError(f"the sequence failed on its language server {moves} times (migration_limit="
                                    f"{self.migration_limit}); last: {message_of(failure)}",
                                    status="StatusCode.UNAVAILABLE") from None
            if member is not None:
                avoid.append(member)
            else:
                time.sleep(min(0.2 * moves, 1.0))  # none ready: give a restarting server a moment
            if self.on_migrate is not None:
                self.on_migrate()
            corrid = secrets.randbits(63) or 1

    def _on(self, member, corrid: int, enc: Encoded, max_tokens: int, delivered: list[int], sampling: dict,
            key: bytes = b""):
        """The request on one language server, from the tokens already `delivered`."""
        lang, started = member.lang, False
        self.pool.started(member, key)
        try:
            held = lang.start(corrid, enc, max_tokens - len(delivered), prior_ids=delivered, **sampling)
            started = True
            stats = TransferStats()
            try:
                send_table(lang, corrid, self.source(enc), self.chunk_rows, held.received, stats,
                           window=self.chunk_window, missing=held.missing)
            finally:
                with self._stats_lock:
                    self.stats.add(stats)
            yield from lang.generate(corrid, 0)
        finally:
            self.pool.finished(member)
            if started:
                lang.end(corrid)

    def run(self, enc: Encoded, max_tokens: int, sequence_id: int | None = None, key: bytes = b"",
            **sampling) -> Iterator[str]:
        """Transfer an encoded request and stream its text; the sequence is ended afterwards."""
        for text, _ in self.tokens(enc, max_tokens, key, sequence_id, **sampling):
            yield text

    def generate(self, prompt: str | None = None, images=(), max_tokens: int = 128, sequence_id: int | None = None,
                 messages=None, videos=(), **sampling) -> Iterator[str]:
        """Text pieces of the whole disaggregated request (a prompt, images and videos, or `messages`)."""
        from qwen3vl_triton.transfer.pool import conversation_key

        with self.transport.hold():  # a shared region holds this request's table until it is sent
            enc = self.encode(prompt, images, max_tokens, messages, videos)
            key = conversation_key(None, messages, prompt, [*images, *videos])
            pieces = self.tokens(enc, max_tokens, key, sequence_id, rows_kept=self.transport.table_in_response,
                                 **sampling)
            first = next(pieces, None)  # the table is sent once the first piece came
        if first is None:
            return
        yield first[0]
        for text, _ in pieces:
            yield text


def _movable(exc: TransferError) -> bool:
    """Whether a failure on a language server is the server's (the sequence moves to another) rather
    than the request's: a broken stream, UNAVAILABLE, an internal failure, or a sequence the
    server lost; a bad input (refused at `start`, with no received_rows) is the request's."""
    from qwen3vl_triton.errors import Code

    if isinstance(exc, StreamBroken):
        return True
    error = exc.error
    if error.code is Code.INVALID_ARG:
        return "has no state" in error.text or "has ended" in error.text or exc.received_rows is not None
    return True
