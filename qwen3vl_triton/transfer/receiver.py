"""Per-sequence state of the disaggregated `language` model (docs/design.md §5).

One Triton sequence (correlation id) per user request. `start` declares the prompt and the
table size, `chunk`s fill the table in order, `generate` runs the LLM once and keeps the
generated tokens, so a client whose stream broke resumes with `from_token` without a second
prefill. The state lives here, in the model instance: the Python backend ignores implicit
sequence state, and it is not told when Triton expires an idle sequence, so the store expires
its own on the same clock -- never while the sequence generates. The number of open sequences
and their table memory are bounded; past a bound a new sequence is refused (UNAVAILABLE).

A sequence's life is its `Phase`, changed only by `Sequence`'s methods:

    RECEIVING --last row--> READY --generate--> GENERATING --the LLM ends--> FINISHED | FAILED
    any of them --END flag, idle expiry (never while GENERATING), internal error--> ENDED

ENDED is final: the store forgets the sequence at once, so its correlation id can start again
at once, and whatever the old generation still produces reaches nobody.

Rows of recent images (`RowCache`, `language_row_cache_bytes`): a sequence whose table is whole
leaves its image rows in a cache keyed by their `prompt_table_extra_ids`; a later `start` that
asks (`reuse_rows`) and whose image rows carry ids the cache holds gets those rows at once, and
`received_rows` counts them (the contiguous prefix held skips them), so its sender sends only the
others (`start` answers their ranges as `missing_rows`): a conversation's next turn moves none of
its earlier images' rows. A start that does not ask starts at received_rows 0, as it always did.
Fail closed: a request with an image token without an id (absent, or 0), or one table row named
with two ids, neither takes nor leaves rows.

A `generate` that carries the END flag frees the correlation id as Triton's sequence batcher does
(`SequenceStore.free_id`): a new `start` on that id is accepted while the old generation goes on
streaming to its own client, and the old sequence is released when its generation ends (or when
that client goes away, which stops the generation). Until then it still counts against the bounds.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qwen3vl_triton.contract import Bounds, SamplingParams, validate
from qwen3vl_triton.errors import LANGUAGE_DRAINING, LANGUAGE_STATE_FULL, InputError, Unavailable
from qwen3vl_triton.text.detok import IncrementalDetokenizer
from qwen3vl_triton.transfer.region import Region, SharedRegions

OPS = ("start", "chunk", "status", "generate", "load")
# the file the launcher creates in the `language` model's folder when its server drains (SIGTERM)
DRAIN_FILE = "draining"
# `start`'s inputs that carry contract values under their own names (docs/design.md §5)
START_NAMES = {"request_output_len": "max_tokens", "prompt_embedding_table": "table_rows"}

class SequenceError(InputError):
    """A request that does not fit the sequence's state (no start, still open, ended, failed)."""

class RowsRefused(SequenceError):
    """A chunk past a gap, `generate` before every row is held, or `start` on an id whose sequence
    is open. `received_rows` (the sequence's) is sent to the client as an output besides the
    message, so a sender resumes exactly there."""

    def __init__(self, input_name: str, message: str, received_rows: int):
        super().__init__(input_name, message)
        self.received_rows = received_rows

def row_keys(input_ids: np.ndarray, extra_ids: np.ndarray | None, vocab_size: int, rows: int,
             levels: int) -> list[int] | None:
    """The row cache's key of each row of the table (model/table.py's layout: `levels + 1` blocks of
    stride S; image token `vocab + j` reads row j and, of DeepStack level k, row (k + 1) S + j):
    the token's `prompt_table_extra_ids` entry and the block, 0 for a row no token reads. None --
    no reuse for the request -- when an image token has no id (no extra ids, or 0) or one row is
    read under two ids."""
    if rows == 0 or extra_ids is None or rows % (levels + 1):
        return None
    ids = np.asarray(input_ids).reshape(-1)
    image = ids >= vocab_size
    extra = np.asarray(extra_ids, np.uint64).reshape(-1)[image]
    at = ids[image].astype(np.int64) - vocab_size
    stride = rows // (levels + 1)
    if not image.any() or (extra == 0).any() or (at >= stride).any():
        return None
    named = np.zeros(stride, np.uint64)
    named[at] = extra
    if (named[at] != extra).any():  # a row named twice, under different ids
        return None
    main = named.tolist()
    return [(e << 8 | block) if e else 0 for block in range(levels + 1) for e in main]


class RowCache:
    """Image rows by their id (`row_keys`), least recently used dropped first past `max_bytes`.
    The ids come from the orchestrator (the first 8 bytes of SHA-256 over the image's content hash
    and the row's index, contract.image_row_ids): a language server trusts its clients, which the
    deployment restricts to the orchestrators (docs/security.md)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._rows: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def take(self, keys: list[int]) -> dict[int, np.ndarray]:
        """The held rows among `keys` (0s skipped), by table row."""
        out = {}
        with self._lock:
            for i, key in enumerate(keys):
                row = self._rows.get(key) if key else None
                if row is not None:
                    self._rows.move_to_end(key)
                    out[i] = row
        return out

    def put(self, keys: list[int], table: np.ndarray) -> None:
        """Keep the rows of `table` under `keys` (copies; rows already held are only refreshed)."""
        if self.max_bytes <= 0 or table.shape[0] == 0 or table[0].nbytes > self.max_bytes:
            return
        with self._lock:
            for i, key in enumerate(keys):
                if not key:
                    continue
                if key in self._rows:
                    self._rows.move_to_end(key)
                    continue
                row = table[i].copy()
                self._rows[key] = row
                self.bytes += row.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._rows.popitem(last=False)
                self.bytes -= old.nbytes


class Phase(enum.Enum):
    RECEIVING = "receiving rows"
    READY = "ready to generate"
    GENERATING = "generating"
    FINISHED = "finished"  # every token is held: a resume replays them
    FAILED = "failed"  # the generation failed; the error is kept for a resuming client
    ENDED = "ended"  # released: nothing is held, nothing is sent

class Listener:
    """The generate stream currently receiving a sequence's tokens.

    `send(text, ids, final)` delivers one response, `fail(message)` ends the stream with an
    error; `cancelled()` says the client went away. `prime(ids)` feeds the detokenizer the
    tokens before `from_token` (which the client already has), so a resumed text continues
    exactly where the broken stream's text stopped.
    """

    def __init__(self, send, fail, cancelled, tokenizer):
        self.send = send
        self._fail = fail
        self.cancelled = cancelled
        self.detok = IncrementalDetokenizer(tokenizer)
        self.closed = False
        self.left = False  # the client went away (its stream was cancelled)

    def prime(self, prior_ids: list[int]) -> None:
        self.detok.add(prior_ids)

    def push(self, ids: list[int], final: bool) -> None:
        if self.closed:
            return
        if self.cancelled():
            self.closed = self.left = True
            return
        text = self.detok.add(ids)
        if final:
            text += self.detok.flush()
            self.closed = True
        if ids or text or final:
            self.send(text, ids, final)

    def fail(self, message: str) -> None:
        """End the stream with an error (when its client may still be there to read it)."""
        if self.closed:
            return
        self.closed = True
        if not self.cancelled():  # may be a period stale: the stream can be gone already
            try:
                self._fail(message)
            except Exception:  # nobody is left to tell
                pass

@dataclass(eq=False)
class Sequence:
    corrid: int
    input_ids: np.ndarray  # (L,) int32 with prompt-table ids
    table: np.ndarray  # (rows, H) filled in order
    mrope_cos_sin: np.ndarray | None
    mrope_delta: int
    max_tokens: int
    sampling: SamplingParams
    extra_ids: np.ndarray | None = None  # (L,) uint64 prompt_table_extra_ids
    clock: Callable[[], float] = time.monotonic
    phase: Phase = Phase.RECEIVING
    received: int = 0  # length of the contiguous prefix of the table held
    tokens: list[int] = field(default_factory=list)  # generated so far
    error: str | None = None
    listener: Listener | None = None
    region: "Region | None" = None  # the shared-memory region this sequence proved it may read
    release_when_done: bool = False  # `generate` came with the END flag
    prior: int = 0  # trailing prompt tokens a generation begun elsewhere produced (start's prior_ids)
    keys: list[int] | None = None  # the row cache's key of each table row (row_keys), None: no reuse
    held: np.ndarray | None = None  # (rows,) bool: rows the row cache filled at start
    # the LLM request's id, unguessable: a `stop` request names it (tensorrtllm's cancellation)
    generation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self):
        self.last_seen = self.clock()
        if self.rows == 0:
            self.phase = Phase.READY

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mrope_cos_sin is None else self.mrope_cos_sin.nbytes
        extra += 0 if self.extra_ids is None else self.extra_ids.nbytes
        return self.table.nbytes + self.input_ids.nbytes + extra

    @property
    def open(self) -> bool:
        return self.phase is not Phase.ENDED

    @property
    def tokens_left(self) -> int:
        """Tokens the sequence may still cost the engine: its prompt until prefilled, and the
        generated tokens still to come (a load figure: see SequenceStore.load)."""
        if self.phase in (Phase.RECEIVING, Phase.READY):
            return int(self.input_ids.size) + self.max_tokens
        if self.phase is Phase.GENERATING:
            return max(self.max_tokens - len(self.tokens), 0)
        return 0

    def touch(self) -> None:
        self.last_seen = self.clock()

    def idle(self, now: float, idle_seconds: float) -> bool:
        """Expired: idle longer than `idle_seconds` and not generating (a running generation keeps
        its sequence alive; the idle clock restarts when it ends)."""
        return self.phase is not Phase.GENERATING and now - self.last_seen > idle_seconds

    def _gone(self) -> SequenceError:
        return SequenceError("op", f"sequence {self.corrid} has ended; start it again")

    # -- transitions -----------------------------------------------------------------------------
    def chunk(self, offset: int, count: int, fill: Callable[[np.ndarray, int], None]) -> int:
        """Rows [offset, offset + count): the ones not held yet are written by `fill(dest, first)`
        (`first`: the chunk's first row to copy). Returns received_rows; rows already held are
        acknowledged, not re-applied (idempotent)."""
        with self.cond:
            if not self.open:
                raise self._gone()
            if offset < 0 or count < 0 or offset + count > self.rows:
                raise InputError("chunk_offset", f"rows [{offset}, {offset + count}) fall outside the table of "
                                                 f"{self.rows} rows")
            if offset > self.received:
                raise RowsRefused("chunk_offset", f"{offset} is past received_rows={self.received}: resend from "
                                                  f"row {self.received}", self.received)
            end = offset + count
            if end > self.received:
                fill(self.table[self.received:end], self.received - offset)
                self.received = end
                self._skip_held()
            return self.received

    def _skip_held(self) -> None:
        """`received` past the rows the row cache filled; READY once every row is held."""
        if self.held is not None:
            while self.received < self.rows and self.held[self.received]:
                self.received += 1
        if self.received == self.rows and self.phase is Phase.RECEIVING:
            self.phase = Phase.READY

    def fill_held(self, rows: dict[int, np.ndarray]) -> int:
        """Rows the row cache holds, put in place at start; returns how many."""
        with self.cond:
            if not rows or self.phase is not Phase.RECEIVING:
                return 0
            self.held = np.zeros(self.rows, bool)
            for i, row in rows.items():
                self.table[i] = row
                self.held[i] = True
            self._skip_held()
            return len(rows)

    def missing(self) -> list[tuple[int, int]]:
        """The ranges (first row, count) still to send, from `received` on."""
        with self.cond:
            if self.phase is not Phase.RECEIVING:
                return []
            need = np.ones(self.rows - self.received, bool) if self.held is None else ~self.held[self.received:]
            edges = np.flatnonzero(np.diff(np.concatenate([[0], need.astype(np.int8), [0]])))
            return [(self.received + int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]

    def generate(self, listener: Listener, from_token: int, release_when_done: bool = False) -> bool:
        """Make `listener` the sequence's stream from token `from_token`. Returns True when the
        caller must start the LLM (the first `generate`).

        A later `generate` on a sequence that already streams (a client resuming a broken
        stream) takes it over: the earlier stream ends with an error that says so."""
        with self.cond:
            if self.phase is Phase.RECEIVING:
                raise RowsRefused("op", f"generate refused: received_rows={self.received} of {self.rows}; send the "
                                        f"rest from row {self.received}", self.received)
            if self.phase is Phase.FAILED:
                raise SequenceError("op", f"generation failed: {self.error}")
            if not self.open:
                raise self._gone()
            if not 0 <= from_token <= len(self.tokens):
                raise InputError("from_token", f"must be in [0, {len(self.tokens)}] (the tokens generated so far), "
                                               f"got {from_token}")
            before = self.input_ids[self.input_ids.size - self.prior:].tolist() if self.prior else []
            listener.prime(before + self.tokens[:from_token])  # text goes on from the tokens before
            old, self.listener = self.listener, listener
            if old is not None:
                old.fail(f"generate stream replaced: a later generate on sequence {self.corrid} "
                         f"(from_token={from_token}) took it over")
            self.release_when_done = self.release_when_done or release_when_done
            listener.push(self.tokens[from_token:], final=self.phase is Phase.FINISHED)
            if self.phase is Phase.READY:
                self.phase = Phase.GENERATING
                return True
            if self.phase is Phase.FINISHED and self.release_when_done:
                self._end_locked()
            return False

    def record(self, ids: list[int], final: bool, error: str | None = None) -> None:
        """Tokens (or the end, or an error) from the LLM, forwarded to the stream. Ignored once the
        sequence has ended: an old generation never reaches anyone."""
        with self.cond:
            if self.phase is not Phase.GENERATING:
                return
            self.tokens.extend(ids)
            listener = self.listener
            if error is not None:
                self.phase, self.error = Phase.FAILED, error
                self.table = self.table[:0]  # a failed sequence keeps its error, not its table
                if listener is not None:
                    listener.fail(error)
            else:
                if final:
                    self.phase = Phase.FINISHED
                if listener is not None:
                    listener.push(ids, final)
                    if listener.left and self.release_when_done:  # nobody will resume it: stop
                        self._end_locked("the client went away")
                        return
            if self.phase is not Phase.GENERATING:
                self.touch()  # the idle clock starts when the generation ends
                if self.release_when_done:
                    self._end_locked()

    def end(self, reason: str) -> bool:
        """Release everything (END flag, idle expiry, an internal error). Returns True when a
        generation was running: the caller stops the LLM request."""
        with self.cond:
            return self._end_locked(reason)

    def _end_locked(self, reason: str | None = None) -> bool:
        if not self.open:
            return False
        generating = self.phase is Phase.GENERATING
        self.phase = Phase.ENDED
        listener, self.listener = self.listener, None
        if listener is not None and generating:
            listener.fail(reason or "sequence ended")
        self.table = self.table[:0]
        self.mrope_cos_sin = None
        region, self.region = self.region, None
        if region is not None:
            region.close()
        return generating

    def bind_region(self, regions: "SharedRegions", key: str, secret: str) -> "Region":
        """The region `key`, opened once the sequence proves it may read it (see SharedRegions)."""
        with self.cond:
            if not self.open:
                raise self._gone()
            if self.region is not None and self.region.matches(key, secret):
                return self.region
            region = regions.open(key, secret)
            old, self.region = self.region, region
        if old is not None:
            old.close()
        return region

class SequenceStore:
    """Open sequences by correlation id, bounded in number and bytes, expiring after `idle_seconds`."""

    def __init__(self, hidden_size: int, table_dtype, max_bytes: int, idle_seconds: float, vocab_size: int,
                 levels: int, max_sequences: int = 256, max_positions: int = 1 << 30, rotary_dim: int | None = None,
                 max_output_len: int | None = None, row_cache_bytes: int = 0, clock=time.monotonic):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        # what `start` checks: prompt-table ids from vocab_size, `levels` DeepStack levels, the model's
        # max_position_embeddings, `rotary_dim` values per position of mrope_rotary_cos_sin, max_tokens
        self.bounds = Bounds(vocab_size, hidden_size, levels, max_positions, rotary_dim, max_output_len=max_output_len)
        self.table_dtype = np.dtype(table_dtype)
        self.max_bytes = max_bytes
        self.max_sequences = max_sequences
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._seqs: dict[int, Sequence] = {}  # open sequences only
        self._detached: set[Sequence] = set()  # generating after a `generate` with END freed their id
        self._lock = threading.Lock()
        self.started = 0  # sequences started (a counter)
        self.draining = False  # the server is stopping: no new sequence, the open ones go on
        self.row_cache = RowCache(row_cache_bytes)  # rows of recent images (0 bytes: off)
        self.rows_skipped = 0  # table rows a start found in the row cache (a counter)

    # -- bookkeeping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._seqs) + len(self._detached)

    def _held(self) -> list[Sequence]:
        return [*self._seqs.values(), *self._detached]

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._held())

    def load(self) -> tuple[int, int]:
        """(open sequences, tokens they may still cost): what a router weighs servers by."""
        with self._lock:
            held = self._held()
        return len(held), sum(s.tokens_left for s in held)

    def free_id(self, corrid: int) -> None:
        """The END flag on a `generate`: `corrid` may start again at once; the sequence under it,
        if still generating, is held apart until `release` (its generation's end)."""
        with self._lock:
            seq = self._seqs.pop(corrid, None)
            if seq is not None and seq.open:
                self._detached.add(seq)

    def expire(self) -> list[Sequence]:
        """End the sequences idle longer than `idle_seconds` (Triton has released them too)."""
        now = self.clock()
        with self._lock:
            old = [s for s in self._seqs.values() if s.idle(now, self.idle_seconds)]
            for s in old:
                del self._seqs[s.corrid]
        for s in old:
            s.end("the sequence expired")
        return old

    def end(self, corrid: int, reason: str) -> str | None:
        """Forget `corrid` and end its open sequence, if any. Returns the generation id of the LLM
        request the caller must stop, when one was running."""
        with self._lock:
            seq = self._seqs.pop(corrid, None)
        if seq is not None and seq.end(reason):
            return seq.generation_id
        return None

    def release(self, seq: Sequence) -> None:
        """Forget `seq` if it is still the one under its id (never a newer sequence of that id)."""
        with self._lock:
            self._detached.discard(seq)
            if self._seqs.get(seq.corrid) is seq:
                del self._seqs[seq.corrid]

    def get(self, corrid: int) -> Sequence:
        with self._lock:
            seq = self._seqs.get(corrid)
            if seq is None:
                raise SequenceError("op", f"sequence {corrid} has no state: it was never started, has ended, "
                                          "expired after being idle, or failed; start it again")
            seq.touch()
            return seq

    # -- ops ---------------------------------------------------------------------------------------
    def start(self, corrid: int, input_ids: np.ndarray, table_rows: int, prompt_vocab_size: int | None,
              mrope_cos_sin: np.ndarray | None, mrope_delta: int, max_tokens: int,
              sampling: SamplingParams, extra_ids: np.ndarray | None = None, prior: int = 0,
              reuse_rows: bool = False) -> Sequence:
        if table_rows < 0:
            raise InputError("table_rows", f"must be >= 0, got {table_rows}")
        if prompt_vocab_size is not None and prompt_vocab_size != table_rows:
            raise InputError("prompt_vocab_size", f"is {prompt_vocab_size} but table_rows is {table_rows}")
        validate(self.bounds, input_ids, max_new_tokens=max_tokens, table_rows=table_rows,
                 mrope_cos_sin=mrope_cos_sin, mrope_delta=mrope_delta, names=START_NAMES)
        ids = np.ascontiguousarray(input_ids, dtype=np.int32).reshape(-1)
        if extra_ids is not None:
            extra_ids = np.asarray(extra_ids).reshape(-1)
            if extra_ids.dtype.kind not in "iu" or extra_ids.size != ids.size:
                raise InputError("prompt_table_extra_ids", f"must be {ids.size} unsigned 64-bit ids (one per "
                                                           f"input token), got {extra_ids.size} {extra_ids.dtype}")
            extra_ids = extra_ids.astype(np.uint64)
        if mrope_cos_sin is not None:
            mrope_cos_sin = np.ascontiguousarray(mrope_cos_sin, np.float32).reshape(-1)
        need = table_rows * self.hidden_size * self.table_dtype.itemsize + ids.nbytes
        need += 0 if mrope_cos_sin is None else mrope_cos_sin.nbytes
        need += 0 if extra_ids is None else extra_ids.nbytes
        with self._lock:
            old = self._seqs.get(corrid)
            if old is not None:  # received_rows says so as data: the open sequence's rows
                raise RowsRefused("op", f"start refused: sequence {corrid} is still open ({old.phase.value}, "
                                        f"received_rows={old.received}); end it (the END flag) before starting it "
                                        "again, or use another correlation id", old.received)
            if self.draining:
                raise Unavailable(f"{LANGUAGE_DRAINING}: it takes no new sequence; start it on another server")
            if len(self._seqs) + len(self._detached) >= self.max_sequences:
                raise Unavailable(f"{LANGUAGE_STATE_FULL} its bound of {self.max_sequences} open "
                                  "sequences (language_max_sequences); retry when other sequences end")
            held = sum(s.nbytes for s in self._held())
            if held + need > self.max_bytes:
                raise Unavailable(
                    f"{LANGUAGE_STATE_FULL} {held} bytes of sequence state for "
                    f"{len(self._seqs) + len(self._detached)} sequences, and this one needs {need} more (bound "
                    f"{self.max_bytes}); retry when other sequences end")
            seq = Sequence(corrid, ids, np.zeros((table_rows, self.hidden_size), self.table_dtype), mrope_cos_sin,
                           int(mrope_delta), int(max_tokens), sampling, extra_ids=extra_ids, clock=self.clock,
                           prior=prior)
            self._seqs[corrid] = seq
            self.started += 1
        if self.row_cache.max_bytes > 0:
            seq.keys = row_keys(ids, extra_ids, self.vocab_size, table_rows, self.bounds.levels)
            if seq.keys is not None and reuse_rows:
                skipped = seq.fill_held(self.row_cache.take(seq.keys))
                with self._lock:
                    self.rows_skipped += skipped
        return seq

    def _received(self, seq: Sequence, before: int, received: int) -> int:
        """After a chunk: a table that has just become whole leaves its rows in the row cache."""
        if received == seq.rows and before < seq.rows and seq.keys is not None:
            with seq.cond:
                table = seq.table if seq.open else None
            if table is not None and table.shape[0] == seq.rows:
                self.row_cache.put(seq.keys, table)
        return received

    def _check_rows(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.hidden_size:
            raise InputError("chunk", f"must be [rows, {self.hidden_size}], got {list(rows.shape)}")
        if rows.dtype != self.table_dtype:
            raise InputError("chunk", f"must be {self.table_dtype}, got {rows.dtype}")

    def chunk(self, corrid: int, offset: int, rows: np.ndarray) -> int:
        """Apply rows carried by the request at `offset`; return received_rows."""
        self._check_rows(rows)
        seq = self.get(corrid)

        def fill(dest, first):
            dest[...] = rows[first:first + dest.shape[0]]

        before = seq.received
        return self._received(seq, before, seq.chunk(offset, rows.shape[0], fill))

    def chunk_from_region(self, corrid: int, offset: int, count: int, regions: "SharedRegions", key: str,
                          secret: str, byte_offset: int) -> int:
        """Apply `count` rows read from the shared-memory region `key` at `byte_offset` (the
        sequence must prove it may read the region: see SharedRegions); return received_rows."""
        seq = self.get(corrid)
        region = seq.bind_region(regions, key, secret)
        row_bytes = self.hidden_size * self.table_dtype.itemsize

        def fill(dest, first):
            region.read_into(dest, byte_offset + first * row_bytes)

        before = seq.received
        return self._received(seq, before, seq.chunk(offset, count, fill))

    def status(self, corrid: int) -> Sequence:
        return self.get(corrid)
