"""Encoder and language servers in separate processes: resumable transfer, faults, bounds, expiry."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

from client import Client, ClientError
from qwen3vl_triton.transfer.sender import Disaggregated, LanguageClient, TransferError
from tests.conftest import ROOT, start_server
from tests.oracle import image_bytes
from tests.test_server import metric, wait_for

pytestmark = pytest.mark.server

CASES = [
    ("one image", "Describe this image in short.", [image_bytes(100, 150, 1)], 24),
    ("two images", "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3, fmt="JPEG")], 30),
    ("text only", "Tell me about the ocean.", [], 40),
]


def disagg(encoder_server, language_server, **kw):
    return Disaggregated(encoder_server.grpc_url, language_server.grpc_url, **kw)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("name, prompt, images, n", CASES, ids=[c[0] for c in CASES])
def test_disaggregated_equals_the_oracle_and_the_single_server(name, prompt, images, n, transport, encoder_server,
                                                               language_server, server, oracle):
    with disagg(encoder_server, language_server, transport=transport, chunk_rows=16) as d:
        text = "".join(d.generate(prompt, images, max_tokens=n))
    ids = oracle.generate(prompt, images, n)
    assert text == oracle.text(ids)  # the language model sees the end of its stream: exact
    with Client(server.grpc_url) as c:
        oracle.assert_served(c.generate_text(prompt, images, max_tokens=n), ids)


def _faulty_run(encoder_server, language_server, oracle, plan, corrid):
    prompt, images, n = CASES[1][1:]
    with disagg(encoder_server, language_server, chunk_rows=8) as d:
        enc = d.encode(prompt, images, n)
        assert enc.rows >= 4 * 8  # several chunks
        d.transfer(corrid, enc, n, plan=plan)
        text = "".join(t for t, _ in d.stream(corrid))
        d.lang.end(corrid)
        resumes = d.stats.resumes
    assert text == oracle.text(oracle.generate(prompt, images, n))
    return resumes


def test_a_dropped_chunk_is_resent_from_received_rows(encoder_server, language_server, oracle):
    dropped = []

    def drop_third(start, count):
        if start == 16 and not dropped:  # the chunk at row 16 is lost once
            dropped.append(start)
            return [(start + count, min(count, 8))]
        return [(start, count)]

    assert _faulty_run(encoder_server, language_server, oracle, drop_third, 101) >= 1


def test_a_duplicated_chunk_is_acknowledged_once(encoder_server, language_server, oracle):
    assert _faulty_run(encoder_server, language_server, oracle, lambda s, c: [(s, c), (s, c)], 102) == 0


def test_reordered_chunks_end_with_every_row_held(encoder_server, language_server, oracle):
    def swap(start, count):
        return [(start + count, count), (start, count)] if start % 32 == 0 else [(start, count)]

    assert _faulty_run(encoder_server, language_server, oracle,
                       lambda s, c: [p for p in swap(s, c) if p[0] < 4 * 1000], 103) >= 1


SENDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from qwen3vl_triton.transfer.sender import Disaggregated
    from tests.oracle import image_bytes
    d = Disaggregated({enc!r}, {lang!r}, chunk_rows=8)
    enc = d.encode("Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3, fmt="JPEG")], 30)
    d.lang.start({corrid}, enc, 30)
    for start in (0, 8, 16):
        d.lang.chunk({corrid}, start, d.source(enc).rows(start, 8))
    print("sent", flush=True)
    time.sleep(600)  # a sender that hangs after 24 rows: the test kills it
""")


def test_a_killed_sender_is_replaced_by_one_that_resumes_after_status(encoder_server, language_server, oracle):
    corrid = 104
    code = SENDER.format(root=str(ROOT), enc=encoder_server.grpc_url, lang=language_server.grpc_url, corrid=corrid)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    prompt, images, n = CASES[1][1:]
    with disagg(encoder_server, language_server, chunk_rows=8) as d:
        assert d.lang.status(corrid) == 24  # the state survived its sender
        enc = d.encode(prompt, images, n)
        assert d.transfer(corrid, enc, n, resume=True) == enc.rows
        assert d.stats.rows == enc.rows - 24  # only the missing rows were sent
        text = "".join(t for t, _ in d.stream(corrid))
        d.lang.end(corrid)
    assert text == oracle.text(oracle.generate(prompt, images, n))


def test_a_cut_generate_stream_resumes_from_token_without_a_second_prefill(encoder_server, language_server, oracle):
    corrid = 105
    prompt, images, n = CASES[0][1:]
    prefills = metric(language_server, "qwen3vl_language_prefills_total", "language")
    prompt_tokens = metric(language_server, "qwen3vl_engine_prompt_tokens_total", "tensorrt_llm")
    reused = metric(language_server, "qwen3vl_prefix_cache_hit_tokens_total", "tensorrt_llm")
    with disagg(encoder_server, language_server, chunk_rows=64) as d:
        enc = d.encode(prompt, images, n)
        d.transfer(corrid, enc, n)
        first, received = [], 0
        for text, ids in d.lang.generate(corrid):
            first.append(text)
            received += len(ids)
            if received >= 5:
                break  # the client's stream breaks here
        d.lang.close(cancel=True)
        d.lang = LanguageClient(language_server.grpc_url)
        rest = [t for t, _ in d.lang.generate(corrid, from_token=received)]
        d.lang.end(corrid)
    assert "".join(first + rest) == oracle.text(oracle.generate(prompt, images, n))
    assert metric(language_server, "qwen3vl_language_prefills_total", "language") == prefills + 1
    # the prompt once: prefilled, or (an earlier test sent the same prompt) partly from the prefix cache
    prefilled = metric(language_server, "qwen3vl_engine_prompt_tokens_total", "tensorrt_llm") - prompt_tokens
    assert prefilled + metric(language_server, "qwen3vl_prefix_cache_hit_tokens_total", "tensorrt_llm") - reused \
        == enc.input_ids.size


def test_generate_before_the_table_is_complete_is_refused(encoder_server, language_server):
    with disagg(encoder_server, language_server, chunk_rows=8) as d:
        enc = d.encode(*CASES[0][1:])
        d.lang.start(106, enc, 10)
        d.lang.chunk(106, 0, d.source(enc).rows(0, 8))
        with pytest.raises(TransferError, match=rf"generate refused: received_rows=8 of {enc.rows}") as err:
            list(d.lang.generate(106))
        assert err.value.received_rows == 8
        d.lang.end(106)


def test_sixteen_sequences_interleave_their_chunks(encoder_server, language_server, oracle):
    jobs = [(f"Sequence {i} looks at this.", [image_bytes(64 + 16 * i, 64, 60 + i)], 12) for i in range(16)]
    out, errors = {}, []

    def run(i, prompt, images, n):
        try:
            with disagg(encoder_server, language_server, chunk_rows=4) as d:  # many small chunks
                out[i] = "".join(d.generate(prompt, images, max_tokens=n, sequence_id=1000 + i))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for i, (prompt, images, n) in enumerate(jobs):
        assert out[i] == oracle.text(oracle.generate(prompt, images, n))
    assert wait_for(lambda: metric(language_server, "qwen3vl_language_sequences", "language") == 0)


# -- bounds and expiry: language servers with their own settings -----------------------------------
@pytest.fixture(scope="module")
def bounded_language_server(tiny_checkpoint, tmp_path_factory, preprocessor, spec):
    """Room for two one-image sequences of CASES[0], not three."""
    p = preprocessor(CASES[0][1], CASES[0][2])
    # the table, the ids, the rotary table and prompt_table_extra_ids (8 bytes a token)
    one = (4 * p.num_image_tokens * spec.hidden_size * 4 + p.input_ids.nbytes + p.input_ids.size * spec.head_dim * 4
           + p.input_ids.size * 8)
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "bounded", language_state_bytes=2 * one + 100)
    yield srv
    srv.stop()


def test_the_language_server_refuses_at_its_memory_bound_then_accepts(encoder_server, bounded_language_server):
    with disagg(encoder_server, bounded_language_server) as d:
        enc = d.encode(*CASES[0][1:])
        d.lang.start(1, enc, 10)
        d.lang.start(2, enc, 10)
        with pytest.raises(TransferError, match=r"start refused: the language server holds \d+ bytes of sequence "
                                                r"state for 2 sequences"):
            d.lang.start(3, enc, 10)
        d.lang.end(1)
        assert d.lang.start(3, enc, 10).received == 0  # nothing was sent, so nothing is held
        d.transfer(3, enc, 10, resume=True)
        assert "".join(t for t, _ in d.stream(3)) is not None
        d.lang.end(2)
        d.lang.end(3)


@pytest.fixture(scope="module")
def idle_language_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "idle", sequence_idle_us=1_500_000)
    yield srv
    srv.stop()


def test_a_request_after_idle_expiry_gets_a_clear_error(encoder_server, idle_language_server):
    with disagg(encoder_server, idle_language_server) as d:
        enc = d.encode(*CASES[0][1:])
        d.lang.start(7, enc, 10)
        assert d.lang.status(7) == 0  # alive while used
        time.sleep(2.5)  # idle longer than max_sequence_idle_microseconds (1.5 s)
        assert metric(idle_language_server, "qwen3vl_language_sequences", "language") == 0  # the model let go too
        with pytest.raises(TransferError, match="inference request for sequence 7 to model 'language' must specify "
                                                "the START flag"):
            d.lang.status(7)


def _stub_rss(server, model):
    for p in server.children():
        try:
            if any(f"/{model}/" in part for part in p.cmdline()):
                return p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no stub process for {model}")


def test_after_500_sequences_no_state_is_held_and_memory_is_back(encoder_server, idle_language_server):
    srv = idle_language_server
    with disagg(encoder_server, srv, chunk_rows=32) as d:
        encs = [d.encode(p, i, 2) for _, p, i, _ in CASES]

        def one(k):
            enc = encs[k % len(encs)]
            corrid = 5000 + k
            kind = k % 5
            if kind == 3:  # failed: a start the server refuses, no state created
                with pytest.raises(TransferError, match="table_rows"):
                    d.lang.start(corrid, enc.__class__(**{**enc.__dict__, "rows": enc.rows + 1}), 2)
                return
            d.transfer(corrid, enc, 2)
            if kind == 4:  # expired: abandoned after the transfer
                return
            for _ in d.stream(corrid):
                pass
            d.lang.end(corrid)  # ended

        for k in range(50):
            one(k)
        assert wait_for(lambda: metric(srv, "qwen3vl_language_sequences", "language") == 0, 10)
        warm = _stub_rss(srv, "language")
        for k in range(50, 500):
            one(k)
    assert wait_for(lambda: metric(srv, "qwen3vl_language_sequences", "language") == 0, 10)
    assert metric(srv, "qwen3vl_language_state_bytes", "language") == 0
    after = _stub_rss(srv, "language")
    assert after <= warm + 16 * 2**20, f"language stub grew from {warm >> 20} MiB to {after >> 20} MiB"


@pytest.fixture(scope="module")
def relay_encoder_server(tiny_checkpoint, tmp_path_factory, language_server):
    """An encoder server whose qwen3vl_disagg model sends tables to the language server itself."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "encoder", "relay", language_url=language_server.grpc_url,
                       chunk_rows=16)
    yield srv
    srv.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_the_encoder_host_drives_the_transfer_through_bls(stream, relay_encoder_server, oracle):
    prompt, images, n = CASES[1][1:]
    with Client(relay_encoder_server.grpc_url, "grpc", model="qwen3vl_disagg") as c:
        pieces = list(c.generate(prompt, images, max_tokens=n, stream=stream))
    assert "".join(pieces) == oracle.text(oracle.generate(prompt, images, n))
    assert len(pieces) > 1 if stream else len(pieces) == 1


def test_the_encoder_host_takes_the_trtllm_ensembles_optional_inputs(relay_encoder_server, oracle):
    from tests.test_tools import genai_perf_request, stream_infer

    prompt, images, n = CASES[0][1:]
    arrays = genai_perf_request(prompt, n, beam_width=1, return_log_probs=False)
    arrays.pop("min_length")  # genai-perf without --output-tokens-mean-deterministic
    arrays["image"] = np.array([[images[0]]], np.object_)
    responses, error = stream_infer(relay_encoder_server, arrays, model="qwen3vl_disagg")
    assert error is None, error
    text = "".join(t.decode() for r in responses for t in r.as_numpy("text_output").reshape(-1))
    assert text == oracle.text(oracle.generate(prompt, images, n))
    for name, value, message in [("beam_width", 4, "beam_width: must be 1"),
                                 ("min_length", 4, "min_length: a minimum output length is not implemented")]:
        arrays = genai_perf_request("Hello", 8, **{name: value})
        if name != "min_length":
            arrays.pop("min_length")
        responses, error = stream_infer(relay_encoder_server, arrays, model="qwen3vl_disagg")
        assert not responses and error is not None and message in error.message(), error


def test_the_encoder_host_reports_bad_input_by_name(relay_encoder_server):
    with Client(relay_encoder_server.grpc_url, "grpc", model="qwen3vl_disagg") as c:
        with pytest.raises(ClientError, match=r"image\[0\]: cannot be decoded"):
            c.generate_text("x", [b"garbage"], max_tokens=4)
        assert c.generate_text("Fine again.", max_tokens=3) is not None
