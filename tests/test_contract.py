"""The tensorrt_llm contract's types, the error wire format, and one connection per model instance,
without a server."""

import numpy as np
import pytest

from qwen3vl_triton.contract import INPUTS, FinishReason, LLMRequest, SamplingParams, StopRequest
from qwen3vl_triton.errors import (
    ENGINE_QUEUE_FULL,
    Cancelled,
    Code,
    Failed,
    InputError,
    StreamError,
    Unavailable,
    parse,
    wire,
)


def test_a_request_survives_its_arrays():
    req = LLMRequest(np.array([1, 2, 3], np.int32), 7, end_id=5, pad_id=4, stop_ids=(5, 6),
                     table=np.ones((8, 4), np.float32), mrope_cos_sin=np.zeros(12, np.float32), mrope_delta=-2,
                     sampling=SamplingParams(temperature=0.5, top_k=3, seed=9), streaming=True)
    arrays = req.arrays()
    assert set(arrays) <= set(INPUTS) and all(a.shape[0] == 1 for a in arrays.values())
    back = LLMRequest.from_arrays(arrays)
    for name in ("max_new_tokens", "end_id", "pad_id", "stop_ids", "mrope_delta", "sampling", "streaming"):
        assert getattr(back, name) == getattr(req, name), name
    assert np.array_equal(back.input_ids, req.input_ids) and np.array_equal(back.table, req.table)
    assert back.prompt_vocab_size == 8
    # defaults are left out, as the backend's defaults mean the same
    assert set(LLMRequest(np.array([1]), 1).arrays()) == {"input_ids", "input_lengths", "request_output_len"}


def test_a_stop_request_is_recognised():
    stop = StopRequest("gen-1")
    assert StopRequest.asked(stop.arrays()) and not StopRequest.asked(LLMRequest(np.array([1]), 1).arrays())
    assert stop.json_body()["id"] == "gen-1"


def test_finish_reasons_are_the_strings_clients_see():
    assert FinishReason.STOP == "stop" and str(FinishReason.LENGTH) == "length"
    assert b"stopped" == FinishReason.STOPPED.encode()


@pytest.mark.parametrize("message, code, name, text", [
    ("max_tokens: must be in [1, 256], got 0", Code.INVALID_ARG, "max_tokens", None),
    ("in ensemble 'qwen3vl', messages[0].role: 'tool' is not one of system, user, assistant", Code.INVALID_ARG,
     "messages[0].role", "messages[0].role: 'tool' is not one of system, user, assistant"),
    ("op: generation failed: boom", Code.INVALID_ARG, "op", None),
    (f"{ENGINE_QUEUE_FULL}: the 2 places ... are taken", Code.UNAVAILABLE, None, None),
    ("start refused: the language server holds its bound of 4 open sequences", Code.UNAVAILABLE, None, None),
    ("[StatusCode.UNAVAILABLE] in ensemble 'encode', Exceeds maximum queue size", Code.UNAVAILABLE, None,
     "Exceeds maximum queue size"),
    ("Request for unknown model: 'x' is not found", Code.UNAVAILABLE, None, None),
    ("in ensemble 'qwen3vl', internal error: ZeroDivisionError: x", Code.INTERNAL, None,
     "internal error: ZeroDivisionError: x"),
    ("generation failed: the model's logits are not finite", Code.INTERNAL, None, None),
    ("request cancelled", Code.CANCELLED, None, None),
])
def test_one_parser_reads_every_error_back(message, code, name, text):
    error = parse(message)
    assert (error.code, error.input, error.text) == (code, name, text or message)


@pytest.mark.parametrize("exc", [InputError("end_id", "must be a vocabulary id"),
                                 Unavailable(f"{ENGINE_QUEUE_FULL}: the 2 places are taken"), Cancelled(),
                                 Failed("generation failed: boom"), ZeroDivisionError("x"),
                                 StreamError("top_k: must be >= 0, got -1")])
def test_what_a_backend_sends_parses_to_its_code(exc):
    message, code = wire(exc)
    assert parse(message).code is code


# -- one connection per model instance ----------------------------------------------------------------
class FakeResult:
    def __init__(self, ids):
        self.ids = ids

    def as_numpy(self, name):
        return np.asarray(self.ids, np.int32) if name == "output_ids" else None


class FakeStream:
    made: list = []

    def __init__(self, client, timeout, wait_for_ready=False):
        self.client, self.broken, self.sent, self.closed = client, False, [], False
        FakeStream.made.append(self)

    def submit(self, model, inputs, request_id=None, **kw):
        if self.broken:
            raise StreamError("the stream broke", broken=True)
        self.sent.append((model, request_id, sorted(i.name() for i in inputs)))
        return request_id

    def results(self, rid, model):
        if rid == "breaks":
            self.broken = True
            raise StreamError("the server closed the stream", broken=True)
        yield FakeResult([1, 2])
        yield FakeResult([3])

    def forget(self, rid):
        pass

    def close(self, cancel=None):
        self.closed = True


def test_a_connection_shares_its_streams_and_opens_a_new_one_after_a_break(monkeypatch):
    from qwen3vl_triton.clients import llm

    monkeypatch.setattr(llm, "GrpcStream", FakeStream)
    FakeStream.made = []
    conn = llm.LLMConnection(client=object())  # a client to share: no channel of its own
    req = LLMRequest(np.array([1, 2], np.int32), 3, streaming=True)
    assert [list(ids) for ids in conn.generate(req, "a")] == [[1, 2], [3]]
    assert [list(ids) for ids in conn.generate(req, "b")] == [[1, 2], [3]]
    assert len(FakeStream.made) == 1 and [r for _, r, _ in FakeStream.made[0].sent] == ["a", "b"]
    with pytest.raises(StreamError, match="the server closed the stream"):
        list(conn.generate(req, "breaks"))
    assert list(conn.generate(req, "c"))  # the next request opens a new stream
    assert len(FakeStream.made) == 2 and FakeStream.made[0].closed
    # a caller that leaves early stops its request, on the stop stream
    gen = conn.generate(req, "d")
    next(gen)
    gen.close()
    stops = FakeStream.made[2].sent
    assert stops == [("tensorrt_llm", "d", ["input_ids", "input_lengths", "request_output_len", "stop"])]
    conn.close()


def test_prompt_table_extra_ids_travel_through_arrays_and_are_checked(spec):
    from qwen3vl_triton.contract import image_row_ids

    rows = image_row_ids(b"\x01" * 32, 4)
    assert rows.dtype == np.uint64 and rows.all() and len(set(rows.tolist())) == 4
    assert not np.array_equal(rows, image_row_ids(b"\x02" * 32, 4))  # another image, other ids
    ids = np.array([1, 2, spec.vocab_size, spec.vocab_size + 1, 3], np.int32)
    extra = np.array([0, 0, rows[0], rows[1], 0], np.uint64)
    req = LLMRequest(ids, 4, extra_ids=extra)
    arrays = req.arrays()
    assert arrays["prompt_table_extra_ids"].dtype == np.uint64 and arrays["prompt_table_extra_ids"].shape == (1, 5)
    back = LLMRequest.from_arrays(arrays)
    assert np.array_equal(back.extra_ids, extra)
    with pytest.raises(InputError, match="prompt_table_extra_ids"):
        LLMRequest.from_arrays({**arrays, "prompt_table_extra_ids": extra[None, :3]})
    with pytest.raises(InputError, match="prompt_table_extra_ids"):
        LLMRequest.from_arrays({**arrays, "prompt_table_extra_ids": extra.astype(np.float32)[None]})
