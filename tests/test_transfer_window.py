"""The sender's chunk window (transfer.send_table) against the language server's own chunk logic
(SequenceStore), behind a stand-in for the gRPC stream that applies chunks in the order they
were sent, as Triton's sequence batcher does. The real servers run in test_disagg.py; here the
number of chunks in flight can be counted and faults placed exactly."""

import collections
import math

import numpy as np
import pytest

from qwen3vl_triton.model.sampling import SamplingParams
from qwen3vl_triton.transfer.receiver import SequenceStore
from qwen3vl_triton.transfer.sender import Encoded, TransferError, TransferStats, send_table

H, VOCAB, LEVELS, CORRID = 8, 100, 3, 11


class InOrderStream:
    """Answers are computed when read, for every chunk sent before, in sending order."""

    def __init__(self, store: SequenceStore):
        self.store = store
        self.unapplied: collections.deque = collections.deque()
        self.answers: dict[int, object] = {}
        self.outstanding = self.most_outstanding = 0
        self.forgotten: list[int] = []
        self._next = 0

    def send_chunk(self, corrid, offset, rows):
        handle, self._next = self._next, self._next + 1
        self.unapplied.append((handle, corrid, offset, rows))
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        return handle

    def chunk_received(self, handle):
        while handle not in self.answers:
            h, corrid, offset, rows = self.unapplied.popleft()
            try:
                self.answers[h] = self.store.chunk(corrid, offset, rows)
            except Exception as exc:  # noqa: BLE001 -- the server's error response
                self.answers[h] = exc
        self.outstanding -= 1
        answer = self.answers.pop(handle)
        if isinstance(answer, Exception):  # as LanguageClient: received_rows from the refusal's data
            raise TransferError(str(answer), getattr(answer, "received_rows", None))
        return answer

    def abandon(self, handle):
        self.forgotten.append(handle)
        self.outstanding -= 1


class Rows:
    def __init__(self, table):
        self.table = table
        self.enc = Encoded(np.zeros(1, np.int32), table.shape[0], H, np.zeros(1, np.float32), 0)

    def rows(self, start, count):
        return self.table[start:start + count]


def started(rows=4 * 25):
    store = SequenceStore(H, np.float32, 1 << 24, 10.0, VOCAB, LEVELS)
    ids = np.array([1] + [VOCAB + j for j in range(rows // 4)] + [2], np.int32)
    seq = store.start(CORRID, ids, rows, rows, None, 0, 8, SamplingParams())
    table = np.random.default_rng(0).standard_normal((rows, H), dtype=np.float32)
    return store, seq, Rows(table)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_chunks_are_in_flight_up_to_the_window_and_every_row_arrives(window):
    store, seq, source = started()
    lang, stats = InOrderStream(store), TransferStats()
    assert send_table(lang, CORRID, source, 8, stats=stats, window=window) == source.enc.rows
    np.testing.assert_array_equal(seq.table, source.table)
    assert lang.most_outstanding == window
    assert stats.chunks == math.ceil(source.enc.rows / 8) and stats.resumes == 0


def test_a_dropped_chunk_stops_the_window_and_the_sender_resumes_from_received_rows():
    store, seq, source = started()
    lang, stats, dropped = InOrderStream(store), TransferStats(), []

    def drop_at_16(start, count):
        if start == 16 and not dropped:
            dropped.append(start)
            return [(start + count, count)]
        return [(start, count)]

    assert send_table(lang, CORRID, source, 8, stats=stats, plan=drop_at_16, window=4) == source.enc.rows
    np.testing.assert_array_equal(seq.table, source.table)
    assert stats.resumes == 1  # the refusals of the chunks in flight behind the gap make one resync
    assert lang.outstanding == 0


def test_chunks_sent_out_of_order_inside_the_window_still_fill_the_table():
    store, seq, source = started()
    lang, stats = InOrderStream(store), TransferStats()

    def swap(start, count):
        return [(start + count, count), (start, count)] if start % 32 == 0 and start + count < 100 else [(start, count)]

    assert send_table(lang, CORRID, source, 8, stats=stats, plan=swap, window=4) == source.enc.rows
    np.testing.assert_array_equal(seq.table, source.table)


def test_a_failure_without_received_rows_raises_and_forgets_the_chunks_in_flight():
    store, _, source = started()
    lang = InOrderStream(store)
    store.end(CORRID, "expired")  # the sequence expired or failed on the server
    with pytest.raises(TransferError, match="has no state") as err:
        send_table(lang, CORRID, source, 8, window=4)
    assert err.value.received_rows is None
    assert len(lang.forgotten) == 3 and lang.outstanding == 0


def test_window_below_one_is_refused():
    store, _, source = started()
    with pytest.raises(ValueError, match="window must be >= 1"):
        send_table(InOrderStream(store), CORRID, source, 8, window=0)


@pytest.mark.parametrize("held_image", [0, 1])
def test_rows_the_server_held_are_not_sent(held_image):
    """Two images of 6 tokens each (table: 4 blocks of stride 12); the server's row cache holds one
    of them (from an earlier sequence of that image alone): the sender sends only the other's rows,
    in the ranges `start` named, and the table ends whole and equal to the encoder's."""
    rng = np.random.default_rng(1)
    blocks = LEVELS + 1
    images = [rng.standard_normal((blocks, 6, H), dtype=np.float32) for _ in range(2)]
    keys = [np.arange(1, 7, dtype=np.uint64) + 1000 * (i + 1) for i in range(2)]
    store = SequenceStore(H, np.float32, 1 << 24, 10.0, VOCAB, LEVELS, row_cache_bytes=1 << 20)
    alone = np.array([1] + [VOCAB + j for j in range(6)] + [2], np.int32)  # the earlier turn: one image
    alone_ids = np.concatenate([[0], keys[held_image], [0]]).astype(np.uint64)
    store.start(1, alone, 24, 24, None, 0, 8, SamplingParams(), extra_ids=alone_ids)
    store.chunk(1, 0, images[held_image].reshape(24, H))

    ids = np.array([1] + [VOCAB + j for j in range(12)] + [2], np.int32)
    both = np.concatenate([[0], *keys, [0]]).astype(np.uint64)
    seq = store.start(CORRID, ids, 48, 48, None, 0, 8, SamplingParams(), extra_ids=both, reuse_rows=True)
    source = Rows(np.concatenate(images, axis=1).reshape(48, H))
    lang, stats, sent = InOrderStream(store), TransferStats(), []

    def record(start, count):
        sent.append((start, count))
        return [(start, count)]

    missing = seq.missing()
    other = 6 * (1 - held_image)
    assert missing == [(12 * b + other, 6) for b in range(blocks) if 12 * b + other >= seq.received]
    assert send_table(lang, CORRID, source, 4, seq.received, stats, plan=record, missing=missing) == 48
    np.testing.assert_array_equal(seq.table, source.table)
    assert sum(n for _, n in sent) == 24 and all((a - other) % 12 < 6 for a, _ in sent)
    assert stats.skipped == 24 and stats.rows == 24
