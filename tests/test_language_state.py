"""The language model's sequence state, without a server: resumable chunks, bounds, expiry."""

import numpy as np
import pytest

from qwen3vl_triton.errors import InputError
from qwen3vl_triton.language import Listener, SequenceError, SequenceStore, attach, record
from qwen3vl_triton.sampling import SamplingParams

H, VOCAB, LEVELS = 4, 100, 3


def store(max_bytes=1 << 20, idle=10.0, clock=None):
    now = clock or [0.0]
    return SequenceStore(H, np.float32, max_bytes, idle, VOCAB, LEVELS, clock=lambda: now[0]), now


def start(st, corrid=7, n=3):
    ids = np.array([1, 2] + [VOCAB + j for j in range(n)] + [3], np.int32)
    return st.start(corrid, ids, 4 * n, 4 * n, None, 0, 8, SamplingParams())


def rows(a, b):
    return np.arange(a * H, b * H, dtype=np.float32).reshape(b - a, H)


def test_chunks_fill_in_order_and_duplicates_are_acknowledged_not_reapplied():
    st, _ = store()
    seq = start(st)
    assert st.chunk(7, 0, rows(0, 4)) == 4
    assert st.chunk(7, 0, np.zeros((4, H), np.float32)) == 4  # duplicate: acknowledged
    assert st.chunk(7, 2, rows(2, 8)) == 8  # overlaps the held prefix: only rows 4..7 applied
    assert st.chunk(7, 8, rows(8, 12)) == 12
    np.testing.assert_array_equal(seq.table, rows(0, 12))


def test_a_chunk_past_a_gap_is_refused_naming_received_rows():
    st, _ = store()
    start(st)
    st.chunk(7, 0, rows(0, 4))
    with pytest.raises(SequenceError, match=r"chunk_offset: 8 is past received_rows=4: resend from row 4"):
        st.chunk(7, 8, rows(8, 12))
    assert st.status(7).received == 4


def test_generate_before_all_rows_is_refused_the_same_way():
    st, _ = store()
    start(st)
    st.chunk(7, 0, rows(0, 5))
    with pytest.raises(SequenceError, match=r"generate refused: received_rows=5 of 12; send the rest from row 5"):
        st.ready_to_generate(7, 0)


@pytest.mark.parametrize("bad, name", [
    (dict(table_rows=10), "table_rows"),
    (dict(input_ids=np.array([1, VOCAB + 5], np.int32)), "input_ids"),
    (dict(input_ids=np.array([], np.int32)), "input_ids"),
    (dict(prompt_vocab_size=12), "prompt_vocab_size"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_start_validates_its_inputs(bad, name):
    st, _ = store()
    args = dict(corrid=1, input_ids=np.array([1, VOCAB, VOCAB + 1], np.int32), table_rows=8, prompt_vocab_size=None,
                mrope_cos_sin=None, mrope_delta=0, max_tokens=4, sampling=SamplingParams())
    args.update(bad)
    with pytest.raises(InputError) as err:
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


def test_memory_bound_refuses_new_sequences_until_others_end():
    one = 12 * H * 4 + 6 * 4  # table + ids of one sequence
    st, _ = store(max_bytes=2 * one)
    start(st, 1)
    start(st, 2)
    with pytest.raises(SequenceError, match=r"start refused: the language server holds \d+ bytes .*\(bound \d+\)"):
        start(st, 3)
    st.drop(1)
    start(st, 3)
    assert len(st) == 2 and st.bytes_held == 2 * one


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


def test_a_resumed_stream_continues_the_text_exactly(preprocessor, spec):
    """Tokens stay in the state; a second listener from token k gets the rest, text aligned."""
    tok = preprocessor.tokenizer
    ids = tok("Caf\u00e9 \U0001f600 ok", add_special_tokens=False)["input_ids"]
    st = SequenceStore(spec.hidden_size, np.float32, 1 << 20, 10, spec.vocab_size, spec.deepstack_levels)
    seq = st.start(1, np.array([1, 2], np.int32), 4, None, None, 0, 50, SamplingParams())
    got = {"first": [], "second": []}

    def listener(name, prior):
        return Listener(lambda text, new, final: got[name].append((text, new, final)), lambda m: None,
                        lambda: False, tok, prior)

    assert attach(seq, listener("first", []), 0) is True  # the first generate starts the LLM
    cut = 4  # the first stream breaks after 4 tokens
    for i in ids[:cut]:
        record(seq, [i], final=False)
    assert attach(seq, listener("second", seq.tokens[:cut]), cut) is False  # no second generation
    for i in ids[cut:]:
        record(seq, [i], final=False)
    record(seq, [], final=True)
    first = "".join(t for t, _, _ in got["first"])
    second = "".join(t for t, _, _ in got["second"])
    assert first + second == tok.decode(ids)
    assert [i for _, new, _ in got["second"] for i in new] == ids[cut:]
    assert got["first"][-1][2] is True and got["second"][-1][2] is True  # both streams were closed


def test_a_resume_is_not_stopped_by_a_broken_stream_that_cannot_be_told(preprocessor, spec):
    """The cancellation check is rate-limited, so the broken stream may still look alive: ending it
    fails, and the resume must go on regardless."""
    tok = preprocessor.tokenizer
    st = SequenceStore(spec.hidden_size, np.float32, 1 << 20, 10, spec.vocab_size, spec.deepstack_levels)
    seq = st.start(1, np.array([1, 2], np.int32), 4, None, None, 0, 50, SamplingParams())
    sent = []

    def gone(text, new, final):
        if final:
            raise RuntimeError("the response sender of a cancelled request")
        sent.append(("old", new))

    assert attach(seq, Listener(gone, lambda m: None, lambda: False, tok, []), 0) is True
    record(seq, [5], final=False)
    resumed = Listener(lambda text, new, final: sent.append(("new", new)), lambda m: None, lambda: False, tok, [5])
    assert attach(seq, resumed, 1) is False
    record(seq, [6], final=False)
    assert sent == [("old", [5]), ("new", [6])]


def test_shared_regions_read_rows_in_place_and_refuse_foreign_keys():
    import secrets

    import tritonclient.utils.shared_memory as shm

    from qwen3vl_triton.language import SharedRegions

    name = f"qwen3vl_table_{secrets.token_hex(6)}"
    region = shm.create_shared_memory_region(name, f"/{name}", 64 * H * 4)
    try:
        table = np.arange(64 * H, dtype=np.float32).reshape(64, H)
        shm.set_shared_memory_region(region, [table])
        now = [0.0]
        regions = SharedRegions(max_regions=1, idle_seconds=10, clock=lambda: now[0])
        got = regions.rows(f"/{name}", 8 * H * 4, 4, H, np.float32)
        np.testing.assert_array_equal(got, table[8:12])
        st, _ = store()
        seq = start(st)
        st.chunk(7, 0, regions.rows(f"/{name}", 0, 12, H, np.float32))  # the store copies out of the region
        np.testing.assert_array_equal(seq.table, table[:12])
        del got
        with pytest.raises(InputError, match=r"^region_offset: rows \[1000, 1256\) fall outside region"):
            regions.rows(f"/{name}", 1000, 16, H, np.float32)
        with pytest.raises(InputError, match=r"^chunk_region: '/etc/passwd' is not a region key of this project"):
            regions.rows("/etc/passwd", 0, 1, H, np.float32)
        with pytest.raises(InputError, match=r"^chunk_region: no shared-memory region /qwen3vl_table_0000aa"):
            regions.rows("/qwen3vl_table_0000aa", 0, 1, H, np.float32)
        assert len(regions) == 1
        now[0] = 20.0
        regions.expire()
        assert len(regions) == 0  # idle mappings are let go
    finally:
        shm.destroy_shared_memory_region(region)
