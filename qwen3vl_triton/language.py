"""Per-sequence state of the disaggregated `language` model (DESIGN §5).

One Triton sequence (correlation id) per user request. `start` declares the prompt and the
table size, `chunk`s fill the table in order, `generate` runs the LLM once and keeps the
generated tokens, so a client whose stream broke resumes with `from_token` without a second
prefill. The state lives here, in the model instance: the Python backend ignores implicit
sequence state, and it is not told when Triton expires an idle sequence, so the store expires
its own on the same clock. Table memory is bounded; past the bound a new sequence is refused.
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .detok import IncrementalDetokenizer
from .errors import InputError
from .sampling import SamplingParams
from .table import stride_of

OPS = ("start", "chunk", "status", "generate")


class SequenceError(InputError):
    """A request that does not fit the sequence's state (a gap, no start, a full store)."""


@dataclass(eq=False)
class Sequence:
    corrid: int
    input_ids: np.ndarray  # (L,) int32 with prompt-table ids
    table: np.ndarray  # (rows, H) filled in order
    mrope_cos_sin: np.ndarray | None
    mrope_delta: int
    max_tokens: int
    sampling: SamplingParams
    last_seen: float
    received: int = 0  # length of the contiguous prefix of the table held
    tokens: list[int] = field(default_factory=list)  # generated so far
    generating: bool = False
    done: bool = False
    error: str | None = None
    end_requested: bool = False  # free the state once generation finishes
    listener: object | None = None  # the generate stream currently receiving tokens
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mrope_cos_sin is None else self.mrope_cos_sin.nbytes
        return self.table.nbytes + self.input_ids.nbytes + extra


class SequenceStore:
    """Sequences by correlation id, bounded in bytes, expiring after `idle_seconds`."""

    def __init__(self, hidden_size: int, table_dtype, max_bytes: int, idle_seconds: float, vocab_size: int,
                 levels: int, clock=time.monotonic):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size  # prompt-table ids start here
        self.levels = levels  # DeepStack levels stacked under the embeddings
        self.table_dtype = np.dtype(table_dtype)
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._seqs: dict[int, Sequence] = {}
        self._lock = threading.Lock()

    # -- bookkeeping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._seqs)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._seqs.values())

    def expire(self) -> list[Sequence]:
        """Drop sequences idle longer than `idle_seconds` (Triton has released them too)."""
        now = self.clock()
        with self._lock:
            old = [s for s in self._seqs.values() if now - s.last_seen > self.idle_seconds]
            for s in old:
                del self._seqs[s.corrid]
        return old

    def drop(self, corrid: int) -> Sequence | None:
        with self._lock:
            return self._seqs.pop(corrid, None)

    def get(self, corrid: int) -> Sequence:
        with self._lock:
            seq = self._seqs.get(corrid)
            if seq is None:
                raise SequenceError("op", f"sequence {corrid} has no state: it was never started, has ended, "
                                          "expired after being idle, or failed; start it again")
            seq.last_seen = self.clock()
            return seq

    # -- ops ---------------------------------------------------------------------------------------
    def start(self, corrid: int, input_ids: np.ndarray, table_rows: int, prompt_vocab_size: int | None,
              mrope_cos_sin: np.ndarray | None, mrope_delta: int, max_tokens: int,
              sampling: SamplingParams) -> Sequence:
        if table_rows < 0:
            raise InputError("table_rows", f"must be >= 0, got {table_rows}")
        if prompt_vocab_size is not None and prompt_vocab_size != table_rows:
            raise InputError("prompt_vocab_size", f"is {prompt_vocab_size} but table_rows is {table_rows}")
        if max_tokens < 1:
            raise InputError("max_tokens", f"must be >= 1, got {max_tokens}")
        ids = np.ascontiguousarray(input_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise InputError("input_ids", "is empty")
        try:
            stride = stride_of(table_rows, self.levels)
        except ValueError as exc:
            raise InputError("table_rows", str(exc)) from None
        if ids.min() < 0 or ids.max() >= self.vocab_size + stride:
            raise InputError("input_ids", f"ids must be vocabulary ids (< {self.vocab_size}) or one of the {stride} "
                                          f"image rows of the table (< {self.vocab_size + stride})")
        need = table_rows * self.hidden_size * self.table_dtype.itemsize + ids.nbytes
        need += 0 if mrope_cos_sin is None else mrope_cos_sin.nbytes
        with self._lock:
            old = self._seqs.pop(corrid, None)  # START resets a reused correlation id
            held = sum(s.nbytes for s in self._seqs.values())
            if held + need > self.max_bytes:
                if old is not None:
                    self._seqs[corrid] = old
                raise SequenceError(
                    "op", f"start refused: the language server holds {held} bytes of sequence state for "
                          f"{len(self._seqs)} sequences, and this one needs {need} more (bound "
                          f"{self.max_bytes}); retry when other sequences end")
            seq = Sequence(corrid, ids, np.zeros((table_rows, self.hidden_size), self.table_dtype),
                           None if mrope_cos_sin is None else np.ascontiguousarray(mrope_cos_sin, np.float32),
                           int(mrope_delta), int(max_tokens), sampling, self.clock())
            self._seqs[corrid] = seq
        return seq

    def chunk(self, corrid: int, offset: int, rows: np.ndarray) -> int:
        """Apply rows at `offset`; return received_rows. Rows already held are not re-applied."""
        seq = self.get(corrid)
        if rows.ndim != 2 or rows.shape[1] != self.hidden_size:
            raise InputError("chunk", f"must be [rows, {self.hidden_size}], got {list(rows.shape)}")
        if rows.dtype != self.table_dtype:
            raise InputError("chunk", f"must be {self.table_dtype}, got {rows.dtype}")
        with seq.cond:
            if offset < 0 or offset + rows.shape[0] > seq.rows:
                raise InputError("chunk_offset", f"rows [{offset}, {offset + rows.shape[0]}) fall outside the "
                                                 f"table of {seq.rows} rows")
            if offset > seq.received:
                raise SequenceError("chunk_offset", f"{offset} is past received_rows={seq.received}: "
                                                    f"resend from row {seq.received}")
            end = offset + rows.shape[0]
            if end > seq.received:  # new rows; an already-held prefix is skipped (idempotent)
                seq.table[seq.received:end] = rows[seq.received - offset:]
                seq.received = end
            return seq.received

    def status(self, corrid: int) -> Sequence:
        return self.get(corrid)

    def ready_to_generate(self, corrid: int, from_token: int) -> Sequence:
        seq = self.get(corrid)
        if seq.received < seq.rows:
            raise SequenceError("op", f"generate refused: received_rows={seq.received} of {seq.rows}; "
                                      f"send the rest from row {seq.received}")
        if seq.error:
            raise SequenceError("op", f"generation failed: {seq.error}")
        if from_token < 0 or (seq.done and from_token > len(seq.tokens)):
            raise InputError("from_token", f"must be in [0, {len(seq.tokens)}], got {from_token}")
        return seq


class Listener:
    """The generate stream currently receiving a sequence's tokens.

    `send(text, ids, final)` delivers one response, `fail(message)` ends the stream with an
    error; `cancelled()` says the client went away.
    The detokenizer is primed with the tokens before `from_token` (which the client already
    has), so the resumed text continues exactly where the broken stream's text stopped.
    """

    def __init__(self, send, fail, cancelled, tokenizer, prior_ids: list[int]):
        self.send = send
        self.fail = fail
        self.cancelled = cancelled
        self.detok = IncrementalDetokenizer(tokenizer)
        self.detok.add(prior_ids)
        self.closed = False

    def push(self, ids: list[int], final: bool) -> None:
        if self.closed:
            return
        if self.cancelled():
            self.closed = True
            return
        text = self.detok.add(ids)
        if final:
            text += self.detok.flush()
            self.closed = True
        if ids or text or final:
            self.send(text, ids, final)

    def close(self) -> None:
        """Another stream took over (a resume): end this one."""
        if not self.closed:
            self.closed = True
            if not self.cancelled():  # may be a period stale: the old stream can be gone already
                try:
                    self.send("", [], True)
                except Exception:  # nobody is left to tell; the new stream must still start
                    pass


def attach(seq: Sequence, listener: Listener, from_token: int) -> bool:
    """Make `listener` the sequence's stream, catching it up from `from_token`.

    Returns True when the caller must start the generation (the first `generate`)."""
    with seq.cond:
        old, seq.listener = seq.listener, listener
        if old is not None and old is not listener:
            old.close()
        listener.push(seq.tokens[from_token:], final=seq.done)
        first = not seq.generating and not seq.done
        seq.generating = True
        return first


def record(seq: Sequence, ids: list[int], final: bool, error: str | None = None) -> None:
    """Tokens (or the end, or an error) from the LLM for `seq`, forwarded to its stream."""
    with seq.cond:
        seq.tokens.extend(ids)
        if error is not None:
            seq.error = error
            seq.done = True
        elif final:
            seq.done = True
        listener = seq.listener
        if listener is not None:
            if error is not None:
                if not listener.closed:
                    listener.closed = True
                    listener.fail(error)
            else:
                listener.push(ids, final)


class SharedRegions:
    """System shared-memory regions of co-located senders, mapped once, read in place.

    A `chunk` request may name rows of a region instead of carrying them: the rows are copied
    straight from the mapping into the sequence's table (one copy; none through Triton). Only
    regions named like the package's senders name theirs are opened. A mapping keeps its pages
    alive after the sender unlinks the region, so at most `max_regions` stay mapped (least
    recently used unmapped first) and any idle for `idle_seconds` is unmapped.
    """

    KEY = re.compile(r"^/qwen3vl_table_[0-9a-f]{6,32}$")

    def __init__(self, max_regions: int = 16, idle_seconds: float = 300.0, root: str = "/dev/shm",
                 clock=time.monotonic):
        self.max_regions, self.idle_seconds, self.root, self.clock = max_regions, idle_seconds, root, clock
        self._maps: collections.OrderedDict[str, tuple[mmap.mmap, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._maps)

    def _map(self, key: str) -> mmap.mmap:
        if not self.KEY.match(key):
            raise InputError("chunk_region", f"{key!r} is not a region key of this project (/qwen3vl_table_<hex>)")
        try:
            fd = os.open(os.path.join(self.root, key[1:]), os.O_RDONLY)
        except FileNotFoundError:
            raise InputError("chunk_region", f"no shared-memory region {key} on the language server's host: "
                                             "the shm transport needs co-located servers") from None
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def rows(self, key: str, byte_offset: int, count: int, hidden: int, dtype) -> np.ndarray:
        """A read-only view of `count` rows at `byte_offset`; copy it before the next call."""
        dtype = np.dtype(dtype)
        nbytes = count * hidden * dtype.itemsize
        with self._lock:
            entry = self._maps.pop(key, None)
            region = entry[0] if entry else self._map(key)
            self._maps[key] = (region, self.clock())
            self._evict(keep=key)
        if count < 0 or byte_offset < 0 or byte_offset + nbytes > len(region):
            raise InputError("region_offset", f"rows [{byte_offset}, {byte_offset + nbytes}) fall outside region "
                                              f"{key} of {len(region)} bytes")
        return np.frombuffer(region, dtype, count * hidden, byte_offset).reshape(count, hidden)

    def _evict(self, keep: str | None = None) -> None:
        now = self.clock()
        for key in list(self._maps):
            region, used = self._maps[key]
            if key != keep and (len(self._maps) > self.max_regions or now - used > self.idle_seconds):
                try:
                    region.close()
                except BufferError:  # a view is still being copied: try again next time
                    continue
                del self._maps[key]

    def expire(self) -> None:
        with self._lock:
            self._evict()

    def close(self) -> None:
        with self._lock:
            for region, _ in self._maps.values():
                try:
                    region.close()
                except BufferError:
                    pass
            self._maps.clear()
