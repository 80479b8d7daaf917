"""Hostile and careless clients against the real servers: the management APIs, the `language`
sequence lifecycle, shared-memory regions, and bounded queues. Each test names what a client
could do before and asserts the exact refusal it gets now."""

import os
import secrets
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from qwen3vl_triton.clients.grpc_stream import StreamError, infer_input
from qwen3vl_triton.serve import admin
from qwen3vl_triton.transfer.region import REGION_HEADER
from qwen3vl_triton.transfer.sender import Disaggregated, LanguageClient, TransferError
from tests.conftest import LONG_PROMPT, LONG_TOKENS, start_server
from tests.oracle import image_bytes
from tests.test_server import metric, wait_for

pytestmark = pytest.mark.server

ONE_IMAGE = ("Describe this image in short.", [image_bytes(100, 150, 1)])
TEXT = ("Tell me about the ocean.", [])
LONG = LONG_TOKENS  # max_tokens of the generations that should run for a while, LONG_PROMPT's (conftest)


@pytest.fixture(scope="module")
def lang_server(tiny_checkpoint, tmp_path_factory):
    """A language server that allows long generations (its row cache off: every start receives
    every row, whatever an earlier test sent)."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "lifecycle", max_output_len=LONG,
                       language_row_cache_bytes=0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def encoded(encoder_server):
    """The encoder's output for the two prompts, once (grpc transport: the table comes back)."""
    with Disaggregated(encoder_server.grpc_url, encoder_server.grpc_url) as d:
        return {"image": d.encode(*ONE_IMAGE, 8), "text": d.encode(*TEXT, 8)}


@pytest.fixture(scope="module")
def long_job(encoder_server, lang_server):
    """The encoded prompt whose greedy generation runs long (LONG_PROMPT: past LONG tokens, so on a
    fast quiet host too the generations still run when a test looks), and its tokens."""
    prompts = [LONG_PROMPT]
    best = None
    with Disaggregated(encoder_server.grpc_url, lang_server.grpc_url) as d:
        for prompt in prompts:
            enc = d.encode(prompt, [], 8)  # max_tokens: checked by the encoder only
            cid = started(d.lang, enc, LONG)
            ids = [i for _, new in d.lang.generate(cid) for i in new]
            d.lang.end(cid)
            if best is None or len(ids) > len(best[1]):
                best = (enc, ids)
    assert len(best[1]) >= LONG // 2, f"the prompt does not generate long enough ({len(best[1])} tokens)"
    return best


def corrid() -> int:
    return secrets.randbits(62) + 1


def answers(lang: LanguageClient, inputs, **kw) -> list:
    """What the server sends for one request: ("received_rows", n), ("text", s), then maybe ("error", msg)."""
    out = []
    try:
        for r in lang.stream.results(lang.stream.submit("language", inputs, **kw), "language"):
            rows, text = r.as_numpy("received_rows"), r.as_numpy("text_output")
            if rows is not None:
                out.append(("received_rows", int(rows.reshape(-1)[0])))
            elif text is not None:
                out.append(("text", text.reshape(-1)[0].decode()))
    except StreamError as exc:
        out.append(("error", str(exc)))
    return out


def op(name: bytes):
    return infer_input("op", np.array([[name]], dtype=np.object_))


def started(lang, enc, max_tokens, cid=None):
    """A sequence with its whole table held, ready to generate."""
    cid = cid or corrid()
    lang.start(cid, enc, max_tokens)
    assert lang.chunk(cid, 0, [infer_input("chunk", enc.table[None])]) == enc.rows
    return cid


def engine(server, name):
    return metric(server, f"qwen3vl_engine_{name}", "tensorrt_llm")


# -- finding 4: management APIs -----------------------------------------------------------------------
HTTP_APIS = [("GET", "/v2/systemsharedmemory/status"), ("GET", "/v2/logging"), ("POST", "/v2/logging"),
             ("GET", "/v2/trace/setting"), ("POST", "/v2/trace/setting"), ("POST", "/v2/repository/index"),
             ("POST", "/v2/repository/models/language/unload")]


def http(server, method, path, headers=None):
    body = b"{}" if method == "POST" else None
    if path.endswith("/unload"):
        body = b'{"parameters": {"unload_dependents": false}}'
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("method, path", [a for a in HTTP_APIS if not a[1].endswith("/unload")])
def test_management_http_apis_refuse_a_client_without_the_admin_key(method, path, language_server):
    assert http(language_server, method, path) == (403, '{"error":"This API is restricted, expecting header '
                                                        '\'admin-key\'"}')
    status, _ = http(language_server, method, path, admin.http_headers(language_server.admin_key))
    assert status == 200
    assert http(language_server, "GET", "/v2/health/ready")[0] == 200  # health and inference stay open


def test_model_repository_unload_needs_the_admin_key(language_server):
    """An anonymous client cannot unload a model (the server keeps serving)."""
    status, body = http(language_server, "POST", "/v2/repository/models/language/unload")
    assert (status, body) == (403, '{"error":"This API is restricted, expecting header \'admin-key\'"}')
    assert http(language_server, "GET", "/v2/models/language/ready")[0] == 200


@pytest.mark.parametrize("call", ["get_system_shared_memory_status", "get_log_settings", "get_trace_settings",
                                  "get_model_repository_index"])
def test_management_grpc_apis_refuse_a_client_without_the_admin_key(call, language_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(language_server.grpc_url) as c:
        with pytest.raises(InferenceServerException, match="This protocol is restricted, expecting header "
                                                           "'triton-grpc-protocol-admin-key'"):
            getattr(c, call)()
        assert getattr(c, call)(headers=admin.grpc_headers(language_server.admin_key)) is not None


def test_an_shm_sender_registers_its_region_with_the_key_and_others_cannot_list_it(encoder_server, lang_server,
                                                                                   monkeypatch):
    with Disaggregated(encoder_server.grpc_url, lang_server.grpc_url, transport="shm", chunk_rows=16) as d:
        text = "".join(d.generate(*ONE_IMAGE, max_tokens=6))
        assert text
        status, body = http(encoder_server, "GET", "/v2/systemsharedmemory/status")
        assert status == 403 and d.region not in body
        status, body = http(encoder_server, "GET", "/v2/systemsharedmemory/status",
                            admin.http_headers(encoder_server.admin_key))
        assert status == 200 and d.region in body
    # a wrong key is told as a wrong key, naming where it came from (Triton says "expecting header" either way)
    with pytest.raises(TransferError) as refused:
        Disaggregated(encoder_server.grpc_url, lang_server.grpc_url, transport="shm", admin_key="x" * 20)
    assert str(refused.value).startswith("registering the shm region failed: the encoder server refused the admin "
                                         "key passed to it: it is not that server's key. Set $QWEN3VL_ADMIN_KEY")
    assert "expecting header" not in str(refused.value)
    with monkeypatch.context() as m:
        m.setenv("QWEN3VL_ADMIN_KEY", "y" * 20)
        with pytest.raises(TransferError, match=r"the encoder server refused the admin key in \$QWEN3VL_ADMIN_KEY: "
                                                r"it is not that server's key"):
            Disaggregated(encoder_server.grpc_url, lang_server.grpc_url, transport="shm")


# -- finding 7: the language sequence lifecycle ---------------------------------------------------------
def test_an_op_that_is_not_utf8_is_refused_by_name_and_the_sequence_survives(lang_server, encoded):
    lang = LanguageClient(lang_server.grpc_url)
    try:
        cid = corrid()
        lang.start(cid, encoded["text"], 4)
        assert answers(lang, [op(b"\xff\xfestatus")], sequence_id=cid) == [("error", "op: must be UTF-8 text")]
        assert lang.status(cid) == 0  # the sequence is still there
        lang.end(cid)
    finally:
        lang.close()


@pytest.mark.parametrize("delta", [2**63 - 1, -(2**40)])
def test_a_start_with_mrope_position_deltas_out_of_range_is_refused(delta, lang_server, encoded):
    enc = encoded["text"]
    bad = enc.__class__(**{**enc.__dict__, "mrope_delta": delta})
    lang = LanguageClient(lang_server.grpc_url)
    try:
        with pytest.raises(TransferError, match=rf"^mrope_position_deltas: must be in \[-{enc.input_ids.size}, \d+\] "
                                                rf"for a prompt of {enc.input_ids.size} tokens and max_tokens 4, got "
                                                rf"{delta}$"):
            lang.start(corrid(), bad, 4)
    finally:
        lang.close()


def test_from_token_past_the_generated_tokens_is_refused(lang_server, encoded):
    lang = LanguageClient(lang_server.grpc_url)
    try:
        cid = started(lang, encoded["text"], 4)
        tokens = sum(len(ids) for _, ids in lang.generate(cid))
        with pytest.raises(TransferError, match=rf"^from_token: must be in \[0, {tokens}\] \(the tokens generated so "
                                                rf"far\), got 999$"):
            list(lang.generate(cid, from_token=999))
        assert [t for t, _ in lang.generate(cid, from_token=tokens)] in ([], [""])  # the end, replayed
        lang.end(cid)
    finally:
        lang.close()


def test_a_second_generate_ends_the_first_stream_with_an_explicit_error(lang_server, long_job):
    first, second = LanguageClient(lang_server.grpc_url), LanguageClient(lang_server.grpc_url)
    try:
        cid = started(first, long_job[0], LONG)
        got = 0
        with pytest.raises(TransferError, match=rf"^generate stream replaced: a later generate on sequence {cid} "
                                                r"\(from_token=0\) took it over$"):
            for _, ids in first.generate(cid):
                got += len(ids)
                if got >= 5 and not second.stream.queues:
                    takeover = second.generate(cid, from_token=0)
                    next(takeover)  # the second stream is attached and streaming
        assert got < len(long_job[1])  # the first stream did not end "successfully"
        second.end(cid)
    finally:
        first.close(cancel=True)
        second.close(cancel=True)


def _stub(server, model):
    return next(p for p in server.children() if f"/{model}/" in " ".join(p.cmdline()))


def test_end_during_generations_stops_them_in_the_engine(lang_server, long_job):
    langs = [LanguageClient(lang_server.grpc_url) for _ in range(4)]
    threads = _stub(lang_server, "language").num_threads()
    try:
        cids = [started(lang, long_job[0], LONG) for lang in langs]
        streams = [lang.generate(cid) for lang, cid in zip(langs, cids)]
        for s in streams:
            next(s)  # each generation runs
        # the gauge is exported every stats period: wait for the first export of a running step
        assert wait_for(lambda: engine(lang_server, "running_sequences") >= 1, 5)
        for lang, cid in zip(langs, cids):
            lang.end(cid)
        assert wait_for(lambda: engine(lang_server, "running_sequences") == 0, 5), "generations still running"
        generated = engine(lang_server, "generated_tokens_total")
        time.sleep(1.0)
        assert engine(lang_server, "generated_tokens_total") == generated
        for s in streams:  # each stream was told
            with pytest.raises(TransferError, match=r"generation cancelled: sequence \d+ got the END flag"):
                for _ in s:
                    pass
        assert wait_for(lambda: metric(lang_server, "qwen3vl_language_sequences", "language") == 0, 5)
        # and the model's generation threads have ended (each waited for tensorrt_llm's last response)
        assert wait_for(lambda: _stub(lang_server, "language").num_threads() <= threads, 10)
    finally:
        for lang in langs:
            lang.close(cancel=True)


def test_an_ended_id_starts_again_at_once_and_the_old_generation_never_touches_it(lang_server, encoded, long_job,
                                                                                oracle):
    lang = LanguageClient(lang_server.grpc_url)
    try:
        cid = started(lang, long_job[0], LONG)
        old = lang.generate(cid)
        next(old)
        lang.end(cid)  # END while generating, then the same id at once
        enc = encoded["text"]
        assert lang.start(cid, enc, 12).received == 0
        assert lang.chunk(cid, 0, [infer_input("chunk", enc.table[None])]) == enc.rows
        # the old generation is over (stopped; before, it ran on to its end and then dropped the new one)
        assert wait_for(lambda: engine(lang_server, "running_sequences") == 0, 60)
        time.sleep(0.5)
        assert lang.status(cid) == enc.rows
        text = "".join(t for t, _ in lang.generate(cid))
        assert text == oracle.text(oracle.generate(*TEXT, 12))
        lang.end(cid)
    finally:
        lang.close(cancel=True)


def test_start_on_an_open_id_is_refused_and_leaves_it_open(lang_server, encoded):
    lang = LanguageClient(lang_server.grpc_url)
    try:
        cid = corrid()
        lang.start(cid, encoded["image"], 4)
        lang.chunk(cid, 0, [infer_input("chunk", encoded["image"].table[None, :8])])
        with pytest.raises(TransferError, match=rf"^op: start refused: sequence {cid} is still open \(receiving rows, "
                                                r"received_rows=8\); end it") as err:
            lang.start(cid, encoded["text"], 4)
        assert err.value.received_rows == 8  # as data, besides the message
        assert lang.status(cid) == 8
        lang.end(cid)
    finally:
        lang.close()


def test_a_refusal_sends_received_rows_as_an_output_before_its_error(lang_server, encoded):
    enc = encoded["image"]
    lang = LanguageClient(lang_server.grpc_url)
    try:
        cid = corrid()
        lang.start(cid, enc, 4)
        gap = [op(b"chunk"), infer_input("chunk", enc.table[None, 16:24]),
               infer_input("chunk_offset", np.array([[16]], np.int32))]
        assert answers(lang, gap, sequence_id=cid) == [
            ("received_rows", 0), ("error", "chunk_offset: 16 is past received_rows=0: resend from row 0")]
        assert answers(lang, [op(b"generate")], sequence_id=cid) == [
            ("received_rows", 0), ("error", f"op: generate refused: received_rows=0 of {enc.rows}; send the rest from "
                                            "row 0")]
        lang.end(cid)
    finally:
        lang.close()


@pytest.fixture(scope="module")
def four_slot_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "four", language_max_sequences=4)
    yield srv
    srv.stop()


def test_a_start_past_the_sequence_bound_is_refused_at_once(four_slot_server, encoded):
    lang = LanguageClient(four_slot_server.grpc_url, timeout=20)
    try:
        cids = [corrid() for _ in range(4)]
        for cid in cids:
            lang.start(cid, encoded["text"], 4)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=r"^start refused: the language server holds its bound of 4 "
                                                r"open sequences \(language_max_sequences\); retry when other "
                                                r"sequences end$"):
            lang.start(corrid(), encoded["text"], 4)
        assert time.monotonic() - t0 < 5
        for _ in range(6):  # refused starts do not use up Triton's sequence slots either
            with pytest.raises(TransferError, match="start refused"):
                lang.start(corrid(), encoded["text"], 4)
        lang.end(cids[0])
        assert lang.start(corrid(), encoded["text"], 4).received == 0
    finally:
        lang.close()


IDLE_S = 1.0  # the idle server's sequence idle timeout; eight batched generations outlast it


@pytest.fixture(scope="module")
def idle_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "short-idle",
                       sequence_idle_us=int(IDLE_S * 1e6), max_output_len=LONG)
    yield srv
    srv.stop()


def test_generations_longer_than_the_idle_timeout_finish_with_their_final_response(idle_server, long_job):
    (enc, expected), n = long_job, LONG  # `expected`: the same request alone, on another server
    results, errors = {}, []

    def run(k):
        lang = LanguageClient(idle_server.grpc_url, timeout=60)
        try:
            c = started(lang, enc, n)
            t0 = time.monotonic()
            results[k] = ([i for _, ids in lang.generate(c) for i in ids], time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
        finally:
            lang.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 8
    assert max(s for _, s in results.values()) > IDLE_S, "the generations were shorter than the idle timeout"
    for ids, _ in results.values():
        assert ids == expected  # every token, and the final response (else generate would have raised)


# -- finding 7: shared memory ----------------------------------------------------------------------------
def region_chunk(key, offset, rows, region_offset, secret=None):
    inputs = [op(b"chunk"), infer_input("chunk_region", np.array([[key.encode()]], dtype=np.object_)),
              infer_input("region_offset", np.array([[region_offset]], np.int64)),
              infer_input("chunk_rows", np.array([[rows]], np.int32)),
              infer_input("chunk_offset", np.array([[offset]], np.int32))]
    if secret is not None:
        inputs.append(infer_input("region_secret", np.array([[secret.encode()]], dtype=np.object_)))
    return inputs


def test_a_client_cannot_read_another_clients_table_rows(encoder_server, lang_server):
    with Disaggregated(encoder_server.grpc_url, lang_server.grpc_url, transport="shm", chunk_rows=16) as victim:
        enc = victim.encode(*ONE_IMAGE, 4)  # the victim's table is in its region now
        thief = LanguageClient(lang_server.grpc_url)
        try:
            cid = corrid()
            thief.start(cid, enc, 4)  # a sequence of the thief's own, the victim's region named in its chunks
            assert answers(thief, region_chunk(victim.shm_key, 0, 16, REGION_HEADER), sequence_id=cid) == [
                ("error", "region_secret: is required")]
            assert answers(thief, region_chunk(victim.shm_key, 0, 16, REGION_HEADER, secrets.token_hex(32)),
                           sequence_id=cid) == [
                ("error", f"region_secret: does not match region {victim.shm_key}: a sequence reads only a region "
                          "whose secret its sender wrote")]
            assert thief.status(cid) == 0
            thief.end(cid)
        finally:
            thief.close()
        assert "".join(victim.run(enc, 4))  # the victim's own transfer is unaffected


def shm_path(key):
    return f"/dev/shm/{key[1:]}"


def test_links_and_fifos_in_dev_shm_are_refused_without_blocking_anyone(lang_server, encoded, tmp_path):
    secret = secrets.token_hex(32)
    target = tmp_path / "not-a-region"
    target.write_bytes(b"private" * 1000)
    link, fifo = (f"/qwen3vl_table_{secrets.token_hex(16)}" for _ in range(2))
    os.symlink(target, shm_path(link))
    os.mkfifo(shm_path(fifo))
    lang, other = LanguageClient(lang_server.grpc_url, timeout=20), LanguageClient(lang_server.grpc_url, timeout=20)
    try:
        cid = corrid()
        lang.start(cid, encoded["image"], 4)
        for key in (link, fifo):
            assert answers(lang, region_chunk(key, 0, 4, REGION_HEADER, secret), sequence_id=cid) == [
                ("error", f"chunk_region: {key} is not a regular file of the language server's user")]
        c2 = started(other, encoded["text"], 4)  # another client is served meanwhile
        assert "".join(t for t, _ in other.generate(c2))
        other.end(c2)
        assert lang.status(cid) == 0
        lang.end(cid)
    finally:
        lang.close()
        other.close()
        os.unlink(shm_path(link))
        os.unlink(shm_path(fifo))


def test_a_region_truncated_after_it_was_opened_gives_an_error_and_the_server_serves_on(lang_server, encoded):
    import tritonclient.utils.shared_memory as shm

    from qwen3vl_triton.transfer.region import region_header

    enc = encoded["image"]
    key, secret = f"/qwen3vl_table_{secrets.token_hex(16)}", secrets.token_hex(32)
    handle = shm.create_shared_memory_region(key[1:], key, REGION_HEADER + enc.table.nbytes, create_only=True)
    lang = LanguageClient(lang_server.grpc_url)
    try:
        shm.set_shared_memory_region(handle, [np.frombuffer(region_header(secret), np.uint8)])
        shm.set_shared_memory_region(handle, [enc.table], offset=REGION_HEADER)
        cid = corrid()
        lang.start(cid, enc, 4)
        row = enc.hidden * 4
        assert answers(lang, region_chunk(key, 0, 8, REGION_HEADER, secret), sequence_id=cid) == [("received_rows", 8)]
        os.truncate(shm_path(key), REGION_HEADER + 10 * row)  # the owner shrinks it under the reader
        size = REGION_HEADER + 10 * row
        assert answers(lang, region_chunk(key, 8, 8, REGION_HEADER + 8 * row, secret), sequence_id=cid) == [
            ("error", f"region_offset: bytes [{REGION_HEADER + 8 * row}, {REGION_HEADER + 16 * row}) fall outside "
                      f"region {key} of {size} bytes")]
        assert lang.status(cid) == 8  # the sequence, and the stub, are alive
        assert lang.chunk(cid, 8, [infer_input("chunk", enc.table[None, 8:])]) == enc.rows
        assert "".join(t for t, _ in lang.generate(cid))
        lang.end(cid)
    finally:
        lang.close()
        shm.destroy_shared_memory_region(handle)


# -- bounded queues ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_slot_queue_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(tiny_checkpoint, tmp_path_factory, "encoder", "queue", max_queue_size=1)
    yield srv
    srv.stop()


def test_a_full_model_queue_refuses_at_once_with_unavailable(one_slot_queue_server):
    import tritonclient.grpc as grpcclient

    image = image_bytes(900, 900, 5)
    outcomes = []

    def encode():
        with grpcclient.InferenceServerClient(one_slot_queue_server.grpc_url) as c:
            try:
                c.infer("encode", [infer_input("text_input", np.array([[b"Describe."]], dtype=np.object_)),
                                   infer_input("image", np.array([[image]], dtype=np.object_)),
                                   infer_input("max_tokens", np.array([[4]], np.int32))])
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 -- sorted below
                outcomes.append(str(exc))

    threads = [threading.Thread(target=encode) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [o for o in outcomes if o != "ok"]
    assert "ok" in outcomes and refused, outcomes
    assert all(o.startswith("[StatusCode.UNAVAILABLE] in ensemble 'encode', ") and
               o.endswith("Exceeds maximum queue size") for o in refused), refused
