"""The language model's sequence state, without a server: phases, resumable chunks, bounds, expiry,
and shared-memory regions read only by the sequences that prove they own them."""

import os
import secrets
import threading

import numpy as np
import pytest

from qwen3vl_triton.errors import InputError, Unavailable
from qwen3vl_triton.model.sampling import SamplingParams
from qwen3vl_triton.transfer.receiver import Listener, Phase, RowsRefused, SequenceError, SequenceStore
from qwen3vl_triton.transfer.region import REGION_HEADER, SharedRegions, region_header

H, VOCAB, LEVELS = 4, 100, 3


def store(max_bytes=1 << 20, idle=10.0, clock=None, **kw):
    now = clock or [0.0]
    return SequenceStore(H, np.float32, max_bytes, idle, VOCAB, LEVELS, clock=lambda: now[0], **kw), now


def start(st, corrid=7, n=3, **kw):
    ids = np.array([1, 2] + [VOCAB + j for j in range(n)] + [3], np.int32)
    args = dict(mrope_cos_sin=None, mrope_delta=0, max_tokens=8)
    args.update(kw)
    return st.start(corrid, ids, 4 * n, 4 * n, args["mrope_cos_sin"], args["mrope_delta"], args["max_tokens"],
                    SamplingParams())


def rows(a, b):
    return np.arange(a * H, b * H, dtype=np.float32).reshape(b - a, H)


def fill(st, corrid=7):
    """A started sequence with every row held."""
    seq = start(st, corrid)
    st.chunk(corrid, 0, rows(0, seq.rows))
    return seq


class Stream:
    """A generate stream that records what it was sent."""

    def __init__(self, tokenizer=None, cancelled=False):
        self.sent, self.errors = [], []
        self.listener = Listener(lambda text, ids, final: self.sent.append((text, ids, final)), self.errors.append,
                                 lambda: cancelled, tokenizer or _Ids())

    @property
    def ids(self):
        return [i for _, ids, _ in self.sent for i in ids]

    @property
    def final(self):
        return bool(self.sent) and self.sent[-1][2]


class _Ids:
    """A tokenizer whose text is the ids themselves (enough for the detokenizer)."""

    added_tokens_decoder: dict = {}  # no special tokens to skip

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]


# -- chunks ------------------------------------------------------------------------------------------
def test_chunks_fill_in_order_and_duplicates_are_acknowledged_not_reapplied():
    st, _ = store()
    seq = start(st)
    assert seq.phase is Phase.RECEIVING
    assert st.chunk(7, 0, rows(0, 4)) == 4
    assert st.chunk(7, 0, np.zeros((4, H), np.float32)) == 4  # duplicate: acknowledged
    assert st.chunk(7, 2, rows(2, 8)) == 8  # overlaps the held prefix: only rows 4..7 applied
    assert st.chunk(7, 8, rows(8, 12)) == 12
    np.testing.assert_array_equal(seq.table, rows(0, 12))
    assert seq.phase is Phase.READY


def test_a_chunk_past_a_gap_is_refused_with_received_rows_as_data():
    st, _ = store()
    start(st)
    st.chunk(7, 0, rows(0, 4))
    with pytest.raises(RowsRefused, match=r"chunk_offset: 8 is past received_rows=4: resend from row 4") as err:
        st.chunk(7, 8, rows(8, 12))
    assert err.value.received_rows == 4
    assert st.status(7).received == 4


def test_generate_before_all_rows_is_refused_the_same_way():
    st, _ = store()
    seq = start(st)
    st.chunk(7, 0, rows(0, 5))
    with pytest.raises(RowsRefused, match=r"generate refused: received_rows=5 of 12; send the rest from row 5") as err:
        seq.generate(Stream().listener, 0)
    assert err.value.received_rows == 5 and seq.phase is Phase.RECEIVING


@pytest.mark.parametrize("bad, name, message", [
    (dict(table_rows=10), "table_rows", "is not 4 stacked blocks"),
    (dict(input_ids=np.array([1, VOCAB + 5], np.int32)), "input_ids", "image rows of the table"),
    (dict(input_ids=np.array([], np.int32)), "input_ids", "is empty"),
    (dict(prompt_vocab_size=12), "prompt_vocab_size", "is 12 but table_rows is 8"),
    (dict(max_tokens=0), "max_tokens", "must be >= 1"),
    (dict(mrope_delta=2**63 - 1), "mrope_position_deltas", "must be in [-3, 1021] for a prompt of 3 tokens"),
    (dict(mrope_delta=-4), "mrope_position_deltas", "must be in [-3, 1021]"),
    (dict(mrope_cos_sin=np.zeros(5, np.float32)), "mrope_rotary_cos_sin", "at least 3 positions of 2 values"),
    (dict(mrope_cos_sin=np.full(6, np.nan, np.float32)), "mrope_rotary_cos_sin", "holds NaN or Inf"),
])
def test_start_validates_its_inputs(bad, name, message):
    st, _ = store(max_positions=1028, rotary_dim=2)
    args = dict(corrid=1, input_ids=np.array([1, VOCAB, VOCAB + 1], np.int32), table_rows=8, prompt_vocab_size=None,
                mrope_cos_sin=None, mrope_delta=0, max_tokens=4, sampling=SamplingParams())
    args.update(bad)
    with pytest.raises(InputError, match=rf"^{name}: .*{__import__('re').escape(message)}") as err:
        st.start(**args)
    assert err.value.input == name and len(st) == 0


def test_bad_chunks_name_the_input():
    st, _ = store()
    start(st)
    with pytest.raises(InputError, match=r"^chunk: must be \[rows, 4\]"):
        st.chunk(7, 0, np.zeros((2, 5), np.float32))
    with pytest.raises(InputError, match=r"^chunk: must be float32"):
        st.chunk(7, 0, np.zeros((2, H), np.float16))
    with pytest.raises(InputError, match=r"^chunk_offset: rows \[10, 14\) fall outside"):
        st.chunk(7, 10, np.zeros((4, H), np.float32))


# -- bounds, reuse, expiry ---------------------------------------------------------------------------
def test_memory_bound_refuses_new_sequences_until_others_end():
    one = 12 * H * 4 + 6 * 4  # table + ids of one sequence
    st, _ = store(max_bytes=2 * one)
    start(st, 1)
    start(st, 2)
    with pytest.raises(Unavailable, match=r"start refused: the language server holds \d+ bytes .*\(bound \d+\)"):
        start(st, 3)
    st.end(1, "test")
    start(st, 3)
    assert len(st) == 2 and st.bytes_held == 2 * one


def test_the_sequence_bound_refuses_a_start_at_once():
    st, _ = store(max_sequences=2)
    start(st, 1)
    start(st, 2)
    with pytest.raises(Unavailable, match=r"start refused: the language server holds its bound of 2 open sequences"):
        start(st, 3)
    st.end(2, "test")
    assert start(st, 3).phase is Phase.RECEIVING


def test_start_on_an_open_id_is_refused_and_an_ended_id_starts_again_at_once():
    st, _ = store()
    old = start(st)
    st.chunk(7, 0, rows(0, 4))
    with pytest.raises(RowsRefused, match=r"start refused: sequence 7 is still open \(receiving rows, "
                                          r"received_rows=4\)") as err:
        start(st)
    assert err.value.received_rows == 4 and st.get(7) is old  # the open one is untouched
    assert st.end(7, "END") is None  # it was not generating: nothing to stop
    assert old.phase is Phase.ENDED and old.table.size == 0
    new = start(st)
    assert new is not old and st.get(7) is new


def test_idle_sequences_expire_on_the_store_clock():
    st, now = store(idle=5.0)
    start(st, 1)
    start(st, 2)
    now[0] = 4.0
    st.status(2)  # 2 is used again
    now[0] = 6.0
    assert [s.corrid for s in st.expire()] == [1]
    with pytest.raises(SequenceError, match="sequence 1 has no state"):
        st.status(1)
    now[0] = 20.0
    st.expire()
    assert len(st) == 0 and st.bytes_held == 0


def test_a_running_generation_keeps_its_sequence_alive_and_the_idle_clock_restarts_when_it_ends():
    st, now = store(idle=5.0)
    seq = fill(st)
    stream = Stream()
    assert seq.generate(stream.listener, 0) is True
    now[0] = 60.0  # far past the idle timeout, still generating
    assert st.expire() == [] and seq.phase is Phase.GENERATING
    seq.record([5, 6], final=False)
    seq.record([7], final=True)
    assert stream.ids == [5, 6, 7] and stream.final  # the final response was sent
    now[0] = 64.0
    assert st.expire() == []  # idle for 4 s since the generation ended
    now[0] = 66.0
    assert st.expire() == [seq] and seq.phase is Phase.ENDED


# -- generate ------------------------------------------------------------------------------------------
def test_a_resumed_stream_continues_the_text_exactly(preprocessor, spec):
    """Tokens stay in the state; a second stream from token k gets the rest, text aligned."""
    tok = preprocessor.tokenizer
    ids = tok("Caf\u00e9 \U0001f600 ok", add_special_tokens=False)["input_ids"]
    st = SequenceStore(spec.hidden_size, np.float32, 1 << 20, 10, spec.vocab_size, spec.deepstack_levels)
    seq = st.start(1, np.array([1, 2], np.int32), 4, None, None, 0, 50, SamplingParams())
    st.chunk(1, 0, np.zeros((4, spec.hidden_size), np.float32))
    first = Stream(tok, cancelled=False)
    assert seq.generate(first.listener, 0) is True  # the first generate starts the LLM
    cut = 4  # the first stream breaks after 4 tokens
    for i in ids[:cut]:
        seq.record([i], final=False)
    second = Stream(tok)
    assert seq.generate(second.listener, cut) is False  # no second generation
    for i in ids[cut:]:
        seq.record([i], final=False)
    seq.record([], final=True)
    text = "".join(t for t, _, _ in first.sent) + "".join(t for t, _, _ in second.sent)
    assert text == tok.decode(ids)
    assert second.ids == ids[cut:] and second.final


def test_a_later_generate_takes_the_stream_over_and_the_earlier_one_ends_with_an_error():
    st, _ = store()
    seq = fill(st)
    first, second = Stream(), Stream()
    assert seq.generate(first.listener, 0) is True
    seq.record([5], final=False)
    assert seq.generate(second.listener, 1) is False
    seq.record([6], final=True)
    assert first.ids == [5] and not first.final
    assert first.errors == ["generate stream replaced: a later generate on sequence 7 (from_token=1) took it over"]
    assert second.ids == [6] and second.final and second.errors == []


def test_a_takeover_is_not_stopped_by_a_stream_that_cannot_be_told():
    """The cancellation check is rate-limited, so a broken stream may still look alive: telling it
    fails, and the new stream must go on regardless."""
    st, _ = store()
    seq = fill(st)
    sent = []

    def gone(message):
        raise RuntimeError("the response sender of a cancelled request")

    old = Listener(lambda text, ids, final: sent.append(("old", ids)), gone, lambda: False, _Ids())
    assert seq.generate(old, 0) is True
    seq.record([5], final=False)
    new = Listener(lambda text, ids, final: sent.append(("new", ids)), gone, lambda: False, _Ids())
    assert seq.generate(new, 1) is False
    seq.record([6], final=False)
    assert sent == [("old", [5]), ("new", [6])]


@pytest.mark.parametrize("from_token", [-1, 2])
def test_from_token_must_be_a_token_generated_so_far(from_token):
    st, _ = store()
    seq = fill(st)
    assert seq.generate(Stream().listener, 0) is True
    seq.record([5], final=False)
    with pytest.raises(InputError, match=rf"^from_token: must be in \[0, 1\] \(the tokens generated so far\), got "
                                         rf"{from_token}"):
        seq.generate(Stream().listener, from_token)
    assert seq.phase is Phase.GENERATING


def test_a_failed_generation_keeps_its_error_for_a_resume_and_drops_its_table():
    st, _ = store()
    seq = fill(st)
    stream = Stream()
    seq.generate(stream.listener, 0)
    seq.record([], final=True, error="generation failed: boom")
    assert stream.errors == ["generation failed: boom"] and seq.phase is Phase.FAILED and seq.table.size == 0
    with pytest.raises(SequenceError, match=r"^op: generation failed: generation failed: boom"):
        seq.generate(Stream().listener, 0)


def test_end_during_a_generation_stops_it_and_nothing_of_it_reaches_the_next_sequence_of_the_id():
    st, _ = store()
    old = fill(st)
    stream = Stream()
    assert old.generate(stream.listener, 0) is True
    old.record([5], final=False)
    assert st.end(7, "generation cancelled: sequence 7 got the END flag") == old.generation_id  # stop it
    assert stream.errors == ["generation cancelled: sequence 7 got the END flag"]
    new = fill(st)  # the id starts again at once
    second = Stream()
    assert new.generate(second.listener, 0) is True
    old.record([9, 9], final=False)  # the old generation's last tokens and its end
    old.record([], final=True)
    st.release(old)  # what the old generation's thread does when it ends: forgets only itself
    assert st.get(7) is new and new.tokens == [] and second.sent == [] and stream.ids == [5]
    assert new.generation_id != old.generation_id


def test_generate_with_end_releases_the_sequence_when_the_generation_ends():
    st, _ = store()
    seq = fill(st)
    stream = Stream()
    assert seq.generate(stream.listener, 0, release_when_done=True) is True
    seq.record([5], final=True)
    assert stream.final and seq.phase is Phase.ENDED
    st.release(seq)
    assert len(st) == 0


# -- shared-memory regions ---------------------------------------------------------------------------
@pytest.fixture
def region(tmp_path):
    """A region as a sender makes it: the header with its secret, then a 64-row table."""
    key, secret = f"/qwen3vl_table_{secrets.token_hex(16)}", secrets.token_hex(32)
    table = np.arange(64 * H, dtype=np.float32).reshape(64, H)
    path = tmp_path / key[1:]
    path.write_bytes(region_header(secret).ljust(REGION_HEADER, b"\0") + table.tobytes())
    return SharedRegions(root=str(tmp_path)), key, secret, table, path


def test_a_sequence_reads_region_rows_once_it_proves_the_secret(region):
    regions, key, secret, table, _ = region
    st, _ = store()
    seq = start(st)
    assert st.chunk_from_region(7, 0, 12, regions, key, secret, REGION_HEADER) == 12
    np.testing.assert_array_equal(seq.table, table[:12])
    assert len(regions) == 1  # held by the sequence ...
    st.end(7, "END")
    assert len(regions) == 0  # ... until it ends


def test_a_region_is_refused_to_a_sequence_without_its_secret(region):
    regions, key, _, _, _ = region
    st, _ = store()
    seq = start(st)
    with pytest.raises(InputError, match=rf"^region_secret: does not match region {key}: a sequence reads only a "
                                         "region whose secret its sender wrote"):
        st.chunk_from_region(7, 0, 12, regions, key, secrets.token_hex(32), REGION_HEADER)
    assert seq.received == 0 and not seq.table.any() and len(regions) == 0 and seq.open


def test_region_offsets_outside_the_region_are_refused(region):
    regions, key, secret, _, _ = region
    st, _ = store()
    start(st)
    size = REGION_HEADER + 64 * H * 4
    with pytest.raises(InputError, match=rf"^region_offset: bytes \[{size - 16}, {size + 176}\) fall outside region "):
        st.chunk_from_region(7, 0, 12, regions, key, secret, size - 16)


def test_a_region_truncated_after_it_was_opened_gives_an_error_not_a_signal(region):
    regions, key, secret, table, path = region
    st, _ = store()
    seq = start(st)
    assert st.chunk_from_region(7, 0, 4, regions, key, secret, REGION_HEADER) == 4
    os.truncate(path, REGION_HEADER + 6 * H * 4)  # its owner shrinks it under the reader
    with pytest.raises(InputError, match=r"^region_offset: bytes \[4160, 4288\) fall outside region .* of 4192 bytes"):
        st.chunk_from_region(7, 4, 8, regions, key, secret, REGION_HEADER + 4 * H * 4)
    assert seq.received == 4 and seq.open  # the sequence is intact and can resume from row 4


def test_links_fifos_foreign_names_and_missing_regions_are_refused_without_blocking(region, tmp_path):
    regions, key, secret, _, path = region
    link = f"/qwen3vl_table_{secrets.token_hex(16)}"
    os.symlink(path, tmp_path / link[1:])
    fifo = f"/qwen3vl_table_{secrets.token_hex(16)}"
    os.mkfifo(tmp_path / fifo[1:])
    cases = [
        (link, secret, rf"^chunk_region: {link} is not a regular file of the language server's user"),
        (fifo, secret, rf"^chunk_region: {fifo} is not a regular file of the language server's user"),
        ("/etc/passwd", secret, r"^chunk_region: '/etc/passwd' is not a region key of this project"),
        ("/qwen3vl_table_00aa", secret, r"^chunk_region: '/qwen3vl_table_00aa' is not a region key"),
        (f"/qwen3vl_table_{'0' * 32}", secret, r"^chunk_region: no shared-memory region /qwen3vl_table_0{32} on"),
        (key, "not-hex", r"^region_secret: must be the 64 hex digits"),
    ]
    done = threading.Event()

    def run():
        for name, sec, message in cases:
            with pytest.raises(InputError, match=message):
                regions.open(name, sec)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "opening a region blocked (a FIFO?)"
    assert len(regions) == 0


def test_a_generate_with_end_frees_the_id_while_its_generation_goes_on():
    st, _ = store(max_sequences=2)
    old = fill(st)
    stream = Stream()
    assert old.generate(stream.listener, 0, release_when_done=True) is True
    st.free_id(7)  # what the model does for a generate carrying END
    assert st.load() == (1, old.max_tokens)  # still held, still counted
    new = fill(st)  # a new START on the id is accepted at once
    with pytest.raises(Unavailable, match="its bound of 2 open sequences"):
        start(st, corrid=8)  # the old sequence still counts against the bound
    old.record([5, 6], final=False)
    old.record([7], final=True)
    assert stream.ids == [5, 6, 7] and stream.final and not old.open
    st.release(old)
    assert st.get(7) is new and len(st) == 1


def test_a_freed_sequence_whose_client_left_ends_and_stops():
    st, _ = store()
    seq = fill(st)
    stream = Stream(cancelled=True)
    seq.generate(stream.listener, 0, release_when_done=True)
    st.free_id(7)
    seq.record([5], final=False)
    assert not seq.open  # the caller (the model's generation thread) stops the LLM request
    st.release(seq)
    assert len(st) == 0


def test_a_draining_store_refuses_new_sequences_and_keeps_the_open_ones():
    st, _ = store()
    seq = fill(st)
    st.draining = True
    with pytest.raises(Unavailable, match="^start refused: the language server is draining"):
        start(st, corrid=8)
    assert st.get(7) is seq and seq.generate(Stream().listener, 0) is True


def test_prior_tokens_prime_the_text_of_a_moved_generation():
    st, _ = store()
    ids = np.array([1, 2, 3, 40, 41], np.int32)  # a prompt of three, then two tokens generated elsewhere
    seq = st.start(9, ids, 0, 0, None, 0, 6, SamplingParams(), prior=2)
    stream = Stream()
    seq.generate(stream.listener, 0)
    assert stream.listener.detok.ids == [40, 41]  # the text goes on after them


# -- the row cache: a later start gets the rows of images the server received before ----------------------
def image_start(st, corrid, images, text=(1, 2), extra=None, reuse=True):
    """A sequence of `images` (name, tokens) in turn, each image's token r under the id name * 1000 + r + 1;
    returns it and its table ((LEVELS + 1) blocks of stride S, model/table.py), whose rows depend on the
    image, the block and the token only."""
    ids, keys, at = list(text), [0] * len(text), 0
    for name, n in images:
        ids += [VOCAB + at + r for r in range(n)] + [3]
        keys += [name * 1000 + r + 1 for r in range(n)] + [0]
        at += n
    table = np.zeros(((LEVELS + 1) * at, H), np.float32)
    first = 0
    for name, n in images:
        for block in range(LEVELS + 1):
            table[block * at + first:block * at + first + n] = (name * 100 + block * 10 + np.arange(n))[:, None]
        first += n
    keys = np.array(keys if extra is None else extra(keys), np.uint64)
    seq = st.start(corrid, np.array(ids, np.int32), len(table), len(table), None, 0, 8, SamplingParams(),
                   extra_ids=keys, reuse_rows=reuse)
    return seq, table


def send_missing(st, corrid, seq, table):
    """What a sender does after `start`: each range `missing` names, in order."""
    for first, count in seq.missing():
        st.chunk(corrid, first, table[first:first + count])


def test_a_later_start_takes_held_image_rows_and_is_told_which_to_send():
    st, _ = store(row_cache_bytes=1 << 20)
    first, table = image_start(st, 1, [(5, 3)])
    assert first.held is None and first.missing() == [(0, 12)]
    send_missing(st, 1, first, table)
    assert first.phase is Phase.READY

    assert image_start(st, 9, [(5, 3)], reuse=False)[0].received == 0  # a start that does not ask: every row
    same, table = image_start(st, 2, [(5, 3)])  # the next turn: the same image
    assert same.phase is Phase.READY and same.received == 12 and same.missing() == []
    np.testing.assert_array_equal(same.table, table)

    # a new image after the held one: only its rows are missing (one range in each block)
    both, table = image_start(st, 3, [(5, 3), (6, 2)])
    assert both.received == 3 and both.missing() == [(3, 2), (8, 2), (13, 2), (18, 2)]
    send_missing(st, 3, both, table)
    assert both.phase is Phase.READY
    np.testing.assert_array_equal(both.table, table)

    # a new image before the held one: received stays 0, the held rows are skipped once it is sent
    before, table = image_start(st, 4, [(7, 2), (6, 2)])
    assert before.received == 0 and before.missing() == [(0, 2), (4, 2), (8, 2), (12, 2)]
    send_missing(st, 4, before, table)
    assert before.received == 16 and before.phase is Phase.READY
    np.testing.assert_array_equal(before.table, table)
    assert st.rows_skipped == 12 + 12 + 8


def test_rows_are_taken_only_under_full_ids_and_never_from_another_image():
    st, _ = store(row_cache_bytes=1 << 20)
    seq, table = image_start(st, 1, [(5, 3)])
    send_missing(st, 1, seq, table)
    other, _ = image_start(st, 2, [(9, 3)])  # the same text and positions, another image
    assert other.received == 0 and other.held is None
    # an image token without an id (0) turns reuse off for the whole request: nothing taken
    unnamed, table = image_start(st, 3, [(5, 3)], extra=lambda k: [k[0], k[1], 0, *k[3:]])
    assert unnamed.received == 0 and unnamed.keys is None
    # no ids at all: the same
    plain = st.start(4, np.array([1, VOCAB, VOCAB + 1, VOCAB + 2], np.int32), 12, 12, None, 0, 8, SamplingParams())
    assert plain.received == 0 and plain.keys is None
    # one row read under two ids: malformed, no reuse
    ids = np.array([VOCAB, VOCAB, VOCAB + 1], np.int32)
    twice = st.start(5, ids, 8, 8, None, 0, 8, SamplingParams(), extra_ids=np.array([5001, 5002, 5003], np.uint64),
                     reuse_rows=True)
    assert twice.keys is None
    assert st.rows_skipped == 0
    # what requests without ids sent never entered the cache either
    send_missing(st, 3, unnamed, table)
    assert len(st.row_cache) == 12


def test_the_row_cache_keeps_its_bound_dropping_the_oldest_images_first():
    row = H * 4
    st, _ = store(row_cache_bytes=20 * row)  # two images of 2 tokens (8 rows each), not three
    for corrid, name in enumerate((1, 2, 3), start=1):
        seq, table = image_start(st, corrid, [(name, 2)])
        send_missing(st, corrid, seq, table)
        assert st.row_cache.bytes <= 20 * row
    assert image_start(st, 10, [(1, 2)])[0].received == 0  # the oldest went first
    assert image_start(st, 11, [(3, 2)])[0].received == 8
    off, _ = store(row_cache_bytes=0)
    seq, table = image_start(off, 1, [(1, 2)])
    send_missing(off, 1, seq, table)
    assert image_start(off, 2, [(1, 2)])[0].received == 0 and len(off.row_cache) == 0
