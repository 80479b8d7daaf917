"""Disaggregated serving, client side: encode on the encoder server, move the table to the
language server in resumable chunks, then stream the generation (DESIGN §5).

The same classes serve the CLI (`python -m client disagg`), library users, and a BLS model on
the encoder host. Transports:

- `grpc`: chunks travel as binary tensor payloads (remote servers);
- `shm`: co-located servers; one system shared-memory region, created once and reused: the
  encoder writes `prompt_embedding_table` straight into it (a Triton-registered output region,
  registered with the admin key) and the language server copies each chunk's rows out of it into
  the sequence state (the chunk request names the region, the rows, and the secret the sender
  wrote into the region's header, which proves the sequence may read it: `REGION_*` below), so no
  table byte passes through this process or through Triton's request path;
- `cuda_shm`: the same with a CUDA shared-memory region, on a GPU host.

Chunks of one sequence go out on one gRPC stream, up to a window of them in flight; the language
server applies them in the order sent (send_table).
"""

from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qwen3vl_triton.clients.grpc_stream import GrpcStream, StreamError, infer_input
from qwen3vl_triton.serve import admin
from qwen3vl_triton.transfer.region import REGION_HEADER, region_header


class TransferError(RuntimeError):
    """A request of the disaggregated path failed; `received_rows` is set when the server sent it
    (the `received_rows` output that comes before a refusal's error)."""

    def __init__(self, message: str, received_rows: int | None = None):
        super().__init__(message)
        self.received_rows = received_rows

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
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @property
    def table_bytes(self) -> int:
        return self.rows * self.hidden * self.dtype.itemsize

class LanguageClient:
    """The `language` model's ops over one gRPC stream (one sequence at a time per client)."""

    def __init__(self, url: str, model: str = "language", timeout: float = 120.0):
        self.url, self.model, self.timeout = url, model, timeout
        self.stream = GrpcStream(url, timeout)

    def close(self, cancel: bool = False) -> None:
        self.stream.close(cancel)

    def _results(self, rid: str) -> Iterator:
        """The request's results; on an error, TransferError with the last `received_rows` the
        request's responses carried (a refusal sends it as data before its error)."""
        received = None
        try:
            for r in self.stream.results(rid, self.model):
                out = r.as_numpy("received_rows")
                if out is not None:
                    received = int(out.reshape(-1)[0])
                yield r
        except StreamError as exc:
            if exc.broken:
                raise StreamBroken(str(exc)) from None
            raise TransferError(str(exc), received) from None

    def _request(self, inputs, **kw) -> Iterator:
        yield from self._results(self.stream.submit(self.model, inputs, **kw))

    def _received(self, rid: str) -> int:
        for r in list(self._results(rid)):
            out = r.as_numpy("received_rows")
            if out is not None:
                return int(out.reshape(-1)[0])
        raise TransferError(f"{self.model} answered without received_rows")

    def _rows(self, corrid: int, inputs, start=False, end=False) -> int:
        return self._received(self.stream.submit(self.model, inputs, sequence_id=corrid, sequence_start=start,
                                                 sequence_end=end))

    @staticmethod
    def _op(name: str):
        return infer_input("op", np.array([[name.encode()]], dtype=np.object_))

    def start(self, corrid: int, enc: Encoded, max_tokens: int, temperature=None, top_k=None, top_p=None,
              seed=None) -> int:
        """Open the sequence; a refused start also ends it, so Triton's sequence slot is let go at
        once rather than at the idle timeout."""
        inputs = [self._op("start"),
                  infer_input("input_ids", enc.input_ids.astype(np.int32)[None]),
                  infer_input("table_rows", np.array([[enc.rows]], np.int32)),
                  infer_input("prompt_vocab_size", np.array([[enc.rows]], np.int32)),
                  infer_input("mrope_rotary_cos_sin", enc.mrope_cos_sin.astype(np.float32)[None]),
                  infer_input("mrope_position_deltas", np.array([[enc.mrope_delta]], np.int64)),
                  infer_input("max_tokens", np.array([[max_tokens]], np.int32))]
        for name, value, dtype in (("temperature", temperature, np.float32), ("top_k", top_k, np.int32),
                                   ("top_p", top_p, np.float32), ("seed", seed, np.uint64)):
            if value is not None:
                inputs.append(infer_input(name, np.array([[value]], dtype)))
        try:
            return self._rows(corrid, inputs, start=True)
        except TransferError as exc:
            # a refusal with received_rows: the id holds an open sequence, which is not ours to end
            if exc.received_rows is None:
                self.end(corrid)
            raise

    def chunk(self, corrid: int, offset: int, chunk_inputs: list) -> int:
        return self.chunk_received(self.send_chunk(corrid, offset, chunk_inputs))

    def send_chunk(self, corrid: int, offset: int, chunk_inputs: list) -> str:
        """Send a chunk without waiting for its answer (see `chunk_received`)."""
        return self.stream.submit(self.model, [self._op("chunk"), *chunk_inputs,
                                               infer_input("chunk_offset", np.array([[offset]], np.int32))],
                                  sequence_id=corrid)

    def chunk_received(self, handle: str) -> int:
        """The server's received_rows after a sent chunk; TransferError carries it on a refusal."""
        return self._received(handle)

    def abandon(self, handle: str) -> None:
        """Give up on a sent chunk: its answer, if one comes, is dropped (the server still applies
        it, in order, before anything sent after it)."""
        self.stream.forget(handle)

    def status(self, corrid: int, end: bool = False) -> int:
        return self._rows(corrid, [self._op("status")], end=end)

    def end(self, corrid: int) -> None:
        """Free the sequence's state on the language server."""
        try:
            self.status(corrid, end=True)
        except TransferError:
            pass  # already gone (expired or failed): nothing is held

    def generate(self, corrid: int, from_token: int = 0) -> Iterator[tuple[str, list[int]]]:
        """Yield (text, token ids) per response; StreamBroken if the stream ends early."""
        inputs = [self._op("generate"), infer_input("from_token", np.array([[from_token]], np.int32))]
        for r in self._request(inputs, sequence_id=corrid):
            text = r.as_numpy("text_output")
            if text is None:  # the empty final response, or received_rows before a refusal
                continue
            ids = r.as_numpy("output_ids")
            yield "".join(t.decode("utf-8") for t in text.reshape(-1)), [] if ids is None else ids.reshape(-1).tolist()

class ChunkSource:
    """Where chunk rows come from: the table in memory (grpc), a system shared-memory region the
    language server reads itself (`shm_key`, with the `secret` written into its header; the table
    starts at REGION_HEADER), or a Triton-registered (CUDA) region (`region`)."""

    def __init__(self, enc: Encoded, region: str | None = None, shm_key: str | None = None,
                 secret: str | None = None):
        self.enc, self.region, self.shm_key, self.secret = enc, region, shm_key, secret

    def rows(self, start: int, count: int) -> list:
        """The request inputs that carry rows [start, start + count) of the table."""
        import tritonclient.grpc as grpcclient

        row_bytes = self.enc.hidden * self.enc.dtype.itemsize
        if self.shm_key is not None:
            return [infer_input("chunk_region", np.array([[self.shm_key.encode()]], dtype=np.object_)),
                    infer_input("region_secret", np.array([[self.secret.encode()]], dtype=np.object_)),
                    infer_input("region_offset", np.array([[REGION_HEADER + start * row_bytes]], np.int64)),
                    infer_input("chunk_rows", np.array([[count]], np.int32))]
        if self.region is None:
            return [infer_input("chunk", self.enc.table[start:start + count][None])]
        from tritonclient.utils import np_to_triton_dtype

        t = grpcclient.InferInput("chunk", [1, count, self.enc.hidden], np_to_triton_dtype(self.enc.dtype))
        t.set_shared_memory(self.region, count * row_bytes, offset=start * row_bytes)
        return [t]

@dataclass
class TransferStats:
    chunks: int = 0
    rows: int = 0
    payload_bytes: int = 0  # table bytes moved into the language server
    resumes: int = 0  # times the sender resynchronised from received_rows
    seconds: float = 0.0

def send_table(lang: LanguageClient, corrid: int, source: ChunkSource, chunk_rows: int, received: int = 0,
               stats: TransferStats | None = None, max_resumes: int = 8, plan=None, window: int = 4) -> int:
    """Send rows [received, rows) in chunks; resync from the server's received_rows on refusal.

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
    while received < enc.rows:
        pending = collections.deque()  # (handle, rows) in the order sent
        refused: TransferError | None = None
        position = received  # the next row the plan covers
        queued: collections.deque = collections.deque()  # planned chunks not sent yet
        while True:
            while refused is None and len(pending) < window:
                if not queued:
                    if position >= enc.rows:
                        break
                    count = min(chunk_rows, enc.rows - position)
                    chunks = plan(position, count) if plan else [(position, count)]
                    if not chunks:
                        raise TransferError(f"the chunk plan sends nothing from row {position}", received)
                    queued.extend(chunks)
                    position += count
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
    """Encode on one server, generate on another; resumable at every stage.

    transport: "grpc" (payloads), "shm" (system shared memory, co-located servers) or
    "cuda_shm" (CUDA shared memory on a GPU host). The shared-memory transports register their
    region with the servers' admin key (`admin_key`, default: see admin.default_key)."""

    def __init__(self, encoder_url: str | None, language_url: str, transport: str = "grpc", chunk_rows: int = 1024,
                 region_bytes: int = 64 * 2**20, timeout: float = 120.0, cuda_device: int = 0, chunk_window: int = 4,
                 admin_key: str | None = None):
        """`encoder_url` None: the caller encodes (e.g. a BLS model on the encoder host) and calls `run`."""
        import tritonclient.grpc as grpcclient

        if transport not in ("grpc", "shm", "cuda_shm"):
            raise ValueError(f"transport must be grpc, shm or cuda_shm, got {transport!r}")
        if encoder_url is None and transport != "grpc":
            raise ValueError("shared-memory transports need the encoder server's url to register the region")
        if chunk_rows < 1 or chunk_window < 1:
            raise ValueError(f"chunk_rows and chunk_window must be >= 1, got {chunk_rows} and {chunk_window}")
        self.transport, self.chunk_rows, self.chunk_window, self.timeout = transport, chunk_rows, chunk_window, timeout
        self.encoder = grpcclient.InferenceServerClient(encoder_url) if encoder_url else None
        self.language_url = language_url
        self.lang = LanguageClient(language_url, timeout=timeout)
        self.stats = TransferStats()
        self.region = None
        self.shm_key = None
        self.secret = None
        self.table_offset = 0
        self._shm = None
        self._admin_key = admin_key
        # where the shared region is registered: each server once (they may be the same server)
        self._servers = [c for c in [self.encoder] if c] + ([grpcclient.InferenceServerClient(language_url)]
                                                            if language_url != encoder_url else [])
        if transport != "grpc":
            self._register(region_bytes, cuda_device)

    # -- shared memory (registered once, reused by every request) -------------------------------
    @property
    def _admin(self) -> dict:
        return admin.grpc_headers(self._admin_key or admin.default_key())

    def _register(self, nbytes: int, device: int) -> None:
        self.region = f"qwen3vl_table_{secrets.token_hex(16)}"
        self.region_bytes = nbytes
        try:
            if self.transport == "shm":
                import tritonclient.utils.shared_memory as shm

                self.shm_key = f"/{self.region}"
                self.secret = secrets.token_hex(32)
                self.table_offset = REGION_HEADER
                # create_only: a file already there under this name is someone else's, never reused
                self._shm = shm.create_shared_memory_region(self.region, self.shm_key, nbytes, create_only=True)
                shm.set_shared_memory_region(self._shm, [np.frombuffer(region_header(self.secret), np.uint8)])
                # only the encoder writes through Triton; the language server reads the region itself
                self._servers = [self.encoder]
                self.encoder.register_system_shared_memory(self.region, self.shm_key, nbytes, headers=self._admin)
            else:
                import tritonclient.utils.cuda_shared_memory as cudashm

                self.table_offset = 0
                self._shm = cudashm.create_shared_memory_region(self.region, nbytes, device)
                handle = cudashm.get_raw_handle(self._shm)
                for server in self._servers:
                    server.register_cuda_shared_memory(self.region, handle, device, nbytes, headers=self._admin)
        except Exception as exc:
            self.close()
            raise TransferError(f"registering the {self.transport} region failed: {_message(exc)} (the servers "
                                f"need their admin key: pass admin_key, or set {admin.ENV}; qwen3vl-serve writes "
                                "a key it generated to <build-dir>/admin-key)") from None

    def close(self) -> None:
        try:
            if self.region is not None:
                for server in self._servers:
                    try:
                        if self.transport == "shm":
                            server.unregister_system_shared_memory(self.region, headers=self._admin)
                        else:
                            server.unregister_cuda_shared_memory(self.region, headers=self._admin)
                    except Exception:  # noqa: BLE001 -- the server may already be gone
                        pass
                if self._shm is not None and self.transport == "shm":
                    import tritonclient.utils.shared_memory as shm

                    shm.destroy_shared_memory_region(self._shm)
                elif self._shm is not None:
                    import tritonclient.utils.cuda_shared_memory as cudashm

                    cudashm.destroy_shared_memory_region(self._shm)
                self.region = self._shm = None
        finally:
            self.lang.close()
            for server in self._servers:
                server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- stages ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | None, images=(), max_tokens: int = 128, messages=None) -> Encoded:
        """`prompt` + `images`, or `messages` (OpenAI chat messages, a list or its JSON text)."""
        import json

        import tritonclient.grpc as grpcclient

        if messages is not None:
            text = messages if isinstance(messages, (str, bytes)) else json.dumps(messages)
            first = infer_input("messages", np.array([[text.encode("utf-8") if isinstance(text, str) else text]],
                                                 dtype=np.object_))
        else:
            first = infer_input("text_input", np.array([[prompt.encode("utf-8")]], dtype=np.object_))
        inputs = [first, infer_input("max_tokens", np.array([[max_tokens]], np.int32))]
        if images:
            raw = [i.encode() if isinstance(i, str) else i for i in images]
            inputs.append(infer_input("image", np.array([raw], dtype=np.object_)))
        names = ["input_ids", "prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin",
                 "mrope_position_deltas"]
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        if self.region is not None:  # the encoder writes the table straight into the shared region
            outputs[1].set_shared_memory(self.region, self.region_bytes - self.table_offset, offset=self.table_offset)
        try:
            result = self.encoder.infer("encode", inputs, outputs=outputs, client_timeout=self.timeout)
        except Exception as exc:
            raise TransferError(_message(exc)) from None
        table_meta = result.get_output("prompt_embedding_table")
        hidden = int(table_meta.shape[2])
        from tritonclient.utils import triton_to_np_dtype

        dtype = np.dtype(triton_to_np_dtype(table_meta.datatype))
        return Encoded(
            input_ids=result.as_numpy("input_ids").reshape(-1),
            rows=int(result.as_numpy("prompt_vocab_size").reshape(-1)[0]),
            hidden=hidden,
            mrope_cos_sin=result.as_numpy("mrope_rotary_cos_sin").reshape(-1),
            mrope_delta=int(result.as_numpy("mrope_position_deltas").reshape(-1)[0]),
            table=None if self.region is not None else result.as_numpy("prompt_embedding_table")[0],
            dtype=dtype,
        )

    def source(self, enc: Encoded) -> ChunkSource:
        if self.transport == "shm":
            return ChunkSource(enc, shm_key=self.shm_key, secret=self.secret)
        return ChunkSource(enc, self.region)

    def transfer(self, corrid: int, enc: Encoded, max_tokens: int, resume: bool = False, plan=None,
                 **sampling) -> int:
        """Start the sequence (or, with `resume`, ask its status) and send the missing rows."""
        received = self.lang.status(corrid) if resume else self.lang.start(corrid, enc, max_tokens, **sampling)
        return send_table(self.lang, corrid, self.source(enc), self.chunk_rows, received, self.stats, plan=plan,
                          window=self.chunk_window)

    def stream(self, corrid: int, from_token: int = 0, retries: int = 3) -> Iterator[tuple[str, list[int]]]:
        """Generated (text, ids) from `from_token`; a broken stream is resumed where it stopped."""
        received = from_token
        for attempt in range(retries + 1):
            try:
                for text, ids in self.lang.generate(corrid, received):
                    received += len(ids)
                    yield text, ids
                return
            except StreamBroken:
                if attempt == retries:
                    raise
                self.lang.close(cancel=True)
                self.lang = LanguageClient(self.language_url, timeout=self.timeout)

    def run(self, enc: Encoded, max_tokens: int, sequence_id: int | None = None, **sampling) -> Iterator[str]:
        """Transfer an encoded request and stream its text; the sequence is ended afterwards."""
        corrid = sequence_id or secrets.randbits(63) or 1
        try:
            self.transfer(corrid, enc, max_tokens, **sampling)
            for text, _ in self.stream(corrid):
                yield text
        finally:
            self.lang.end(corrid)

    def generate(self, prompt: str | None = None, images=(), max_tokens: int = 128, sequence_id: int | None = None,
                 messages=None, **sampling) -> Iterator[str]:
        """Text pieces of the whole disaggregated request (a prompt and images, or `messages`)."""
        yield from self.run(self.encode(prompt, images, max_tokens, messages), max_tokens, sequence_id, **sampling)

def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None)
    return msg() if callable(msg) else str(exc)
