"""Scale-out: pools of language servers behind encoder servers, sequences that move when their
language server dies or drains, qwen3vl_disagg's qwen3vl interface, correlation ids freed by END."""

import os
import secrets
import signal
import threading
import time
import warnings

import numpy as np
import pytest

from client import Client, ClientError
from qwen3vl_triton.clients.qwen3vl import Qwen3VLRequest, Qwen3VLResponse
from qwen3vl_triton.transfer.pool import LanguagePool, conversation_key, parse_urls
from qwen3vl_triton.transfer.sender import Disaggregated
from tests.conftest import LONG_PROMPT, LONG_TOKENS, start_server
from tests.oracle import data_url, image_bytes
from tests.tcp_proxy import TcpProxy
from tests.test_server import metric, wait_for
from tests.test_tools import stream_infer


# -- the pool, without servers -------------------------------------------------------------------
class FakeLanguage:
    """A LanguageClient's load call, answered from a dict the test sets."""

    def __init__(self, url, state):
        self.url, self.state = url, state

    def load(self):
        answer = self.state.get(self.url, (0, 0, False))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self, cancel=False):
        pass


def fake_pool(urls, state, **kw):
    return LanguagePool(urls, client_factory=lambda url, _: FakeLanguage(url, state), **kw)


def test_a_conversation_stays_on_its_server_and_a_burst_spreads():
    urls = [f"10.0.0.{i}:8001" for i in range(3)]
    pool = fake_pool(urls, {})
    try:
        key = conversation_key(messages=[{"role": "user", "content": "hello"}])
        first = pool.choose(key)
        for _ in range(5):  # one turn after another, each ended: the same server (its own turns are no load)
            m = pool.choose(key)
            assert m is first
            pool.started(m, key)
            pool.finished(m)
    finally:
        pool.close()
    pool = fake_pool(urls, {})
    try:
        # a burst of 30 new conversations, none ended: every server within the bound of the mean
        counts = {u: 0 for u in urls}
        for i in range(30):
            key = conversation_key(conversation_id=f"user-{i}")
            m = pool.choose(key)
            pool.started(m, key)
            counts[m.url] += 1
        assert all(5 <= c <= 15 for c in counts.values()), counts
        assert max(counts.values()) <= int(np.ceil(pool.balance * 30 / 3)), counts
    finally:
        pool.close()


def test_servers_that_drain_or_fail_are_skipped_until_they_answer_again():
    urls = ["a:1", "b:2", "c:3"]
    state = {"a:1": (0, 0, True), "b:2": ConnectionError("refused")}
    pool = fake_pool(urls, state)
    try:
        assert {pool.choose(conversation_key(conversation_id=str(i))).url for i in range(20)} == {"c:3"}
        pool.failed(pool.members["c:3"], "stream broke")
        with pytest.raises(Exception, match=r"no language server is ready \(a:1: draining; b:2: refused; "
                                            r"c:3: stream broke\)"):
            pool.choose(b"k")
        state.clear()
        pool.refresh()
        assert {pool.choose(conversation_key(conversation_id=str(i))).url for i in range(40)} == set(urls)
    finally:
        pool.close()


def test_dns_members_are_resolved_again():
    pool = fake_pool("dns:localhost:8001", {}, resolve_seconds=0)
    try:
        assert list(pool.members) == ["127.0.0.1:8001"]
        pool.refresh()
        assert list(pool.members) == ["127.0.0.1:8001"]
    finally:
        pool.close()


@pytest.mark.parametrize("text, message", [
    ("", "expected HOST:PORT"), ("a", "'a' is not HOST:PORT"), ("a:0", "'a:0' is not HOST:PORT"),
    ("dns:x", "expected dns:NAME:PORT"), ("a:1,a:1", "listed twice")])
def test_bad_server_lists_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=f"language_urls: .*{message}"):
        parse_urls(text)


def test_conversation_keys():
    image = data_url(image_bytes(32, 32, 1))
    turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "What is it?"}]}]
    turn2 = turn1 + [{"role": "assistant", "content": "A square."}, {"role": "user", "content": "Colour?"}]
    assert conversation_key(messages=turn1) == conversation_key(messages=turn2)
    other = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes(32, 32, 2))}},
                                          {"type": "text", "text": "What is it?"}]}]
    assert conversation_key(messages=turn1) != conversation_key(messages=other)
    assert conversation_key(conversation_id="u1", messages=turn1) == conversation_key(conversation_id="u1")
    assert conversation_key(prompt="p", images=[b"x"]) != conversation_key(prompt="p", images=[b"y"])


def test_seeded_sampling_continues_where_a_moved_generation_left(engine, pipeline):
    """The draws depend on (seed, position): a generation restarted with its first k tokens in the
    prompt draws what the uninterrupted one drew."""
    from qwen3vl_triton.contract import SamplingParams
    from qwen3vl_triton.engine.scheduler import Request

    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    whole = pipeline("Tell me a story.", [image_bytes(64, 64, 5)], max_new_tokens=30, sampling=params)
    full = engine.generate(whole, timeout=120)[0]
    assert len(full) >= 8 and len(set(full)) > 3  # sampled, not one token over and over
    k = len(full) // 2
    moved = Request(np.concatenate([whole.input_ids, np.array(full[:k], np.int32)]), 30 - k, end_id=whole.end_id,
                    stop_ids=whole.stop_ids, table=whole.table, sampling=params, mrope_delta=whole.mrope_delta,
                    mrope_cos_sin=_continued(whole, k, full, engine.spec))
    assert engine.generate(moved, timeout=120)[0] == full[k:]


def _continued(req, k, ids, spec):
    from qwen3vl_triton.model.mrope import continue_cos_sin

    return continue_cos_sin(req.mrope_cos_sin, spec, len(req.input_ids), req.mrope_delta, k)


# -- servers: 3 language servers, 2 encoder servers ------------------------------------------------
LONG = 1200  # tokens of the generations a server's death or drain interrupts (seconds of work each)


@pytest.fixture(scope="module")
def languages(tiny_checkpoint, tmp_path_factory):
    servers = [start_server(tiny_checkpoint, tmp_path_factory, "language", f"pool-language-{i}", max_output_len=LONG)
               for i in range(3)]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def _language_servers_up(request):
    """Every pool language server is up when a test that uses the pool starts. One that died in an
    earlier test's load for a reason of its own -- Triton 2.51's Python backend stub has crashed
    (SIGSEGV in a native thread, `language` answering 24 streams) a few times in many runs, taking
    tritonserver with it; the sequences it held moved, as this module tests -- is started again on
    its ports, as a StatefulSet restarts its pod, with a warning that names it and its log's tail."""
    if "languages" in request.fixturenames:
        languages = request.getfixturevalue("languages")
        for i, server in enumerate(languages):
            if server.process is not None and server.process.poll() is not None:
                log = server.log_file
                tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
                warnings.warn(f"language server {i} ({server.grpc_url}) had exited with code "
                              f"{server.process.returncode} before {request.node.name}; started again. "
                              f"Log tail:\n{tail}", stacklevel=2)
                _restart(languages, i)
    yield


@pytest.fixture(scope="module")
def encoders(tiny_checkpoint, tmp_path_factory, languages):
    urls = ",".join(s.grpc_url for s in languages)
    servers = [start_server(tiny_checkpoint, tmp_path_factory, "encoder", f"pool-encoder-{i}", language_urls=urls,
                            max_output_len=LONG, chunk_rows=64) for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


def pool_metric(server, name, model) -> float:
    """`metric` of a pool server, 0 for one whose process has exited: a pool language server that
    Triton 2.51's Python-backend stub took down during a test (see _language_servers_up) holds no
    sequence -- its sequences moved -- and the test goes on with the others."""
    try:
        return metric(server, name, model)
    except OSError:
        if server.process is not None and server.process.poll() is not None:
            return 0.0
        raise


def started(languages):
    return [metric(s, "qwen3vl_language_sequences_started_total", "language") for s in languages]


def migrations(encoders):
    return sum(metric(s, "qwen3vl_migrations_total", "qwen3vl_disagg") for s in encoders)


def request(url, prompt, images=(), max_tokens=16, **kw):
    """One qwen3vl_disagg request over a gRPC stream: its responses (Qwen3VLResponse) and error."""
    arrays = Qwen3VLRequest(prompt, images, max_tokens, **kw).arrays()
    results, error = stream_infer(None, arrays, url=url, model="qwen3vl_disagg", timeout=300)
    return [Qwen3VLResponse.from_result(r) for r in results], error


@pytest.mark.server
def test_a_generate_with_end_frees_its_id_while_it_finishes(encoders, languages, oracle):
    prompt, images, n = "Describe this image in short.", [image_bytes(100, 150, 1)], 40
    with Disaggregated(encoders[0].grpc_url, languages[0].grpc_url, chunk_rows=64) as d:
        enc = d.encode(prompt, images, n)
        d.transfer(77, enc, n)
        old = d.lang.generate(77, end=True)
        first = next(old)  # the first generation runs
        # the id was freed by END: a new sequence starts at once, its rows held already (the row cache)
        assert d.lang.start(77, enc, n).received == enc.rows
        d.transfer(77, enc, n, resume=True)
        again = "".join(t for t, _ in d.lang.generate(77, end=True))
        rest = "".join(t for t, _ in old)
    expected = oracle.text(oracle.generate(prompt, images, n))
    assert first[0] + rest == expected and again == expected
    assert wait_for(lambda: metric(languages[0], "qwen3vl_language_sequences", "language") == 0)


@pytest.mark.server
def test_qwen3vl_disagg_answers_what_qwen3vl_answers(encoders, oracle):
    prompt, images, n = "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3)], 20
    ids = oracle.generate(prompt, images, n)
    prompt_len = oracle.inputs(prompt, images).input_ids.shape[1]
    for stream in (True, False):
        responses, error = request(encoders[0].grpc_url, prompt, images, n, stream=stream)
        assert error is None, error
        assert len(responses) > 1 if stream else len(responses) == 1
        assert np.concatenate([r.output_ids.reshape(-1) for r in responses]).tolist() == ids
        assert "".join(r.text for r in responses) == oracle.text(ids)
        assert {r.prompt_tokens for r in responses} == {prompt_len}
        assert [r.finish_reason for r in responses][-1] == ("stop" if ids[-1] in oracle.end_ids else "length")
        assert all(r.finish_reason is None for r in responses[:-1])
        assert len({r.generation_id for r in responses}) == 1 and responses[0].generation_id
    text = oracle.text(ids)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    responses, error = request(encoders[1].grpc_url, prompt, images, n, stream=True, stop=[stop])
    assert error is None, error
    assert "".join(r.text for r in responses) == text[:text.index(stop)]
    assert responses[-1].finish_reason == "stop"
    responses, error = request(encoders[1].grpc_url, "Hi", [], 4, stop=[b"\xff"])
    assert error is not None and "stop_words[0]" in error.message()


@pytest.mark.server
def test_a_client_that_leaves_stops_the_generation(encoders, languages):
    before = sum(metric(s, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm") for s in languages)
    with Client(encoders[0].grpc_url, model="qwen3vl_disagg") as c:
        pieces = c.generate(LONG_PROMPT, max_tokens=LONG)
        for _ in range(3):
            next(pieces)
        pieces.close()
    assert wait_for(lambda: sum(metric(s, "qwen3vl_language_sequences", "language") for s in languages) == 0, 10)
    time.sleep(1.0)
    settled = sum(metric(s, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm") for s in languages)
    assert settled - before < LONG  # stopped before its end
    time.sleep(1.0)
    assert sum(metric(s, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm") for s in languages) == settled


@pytest.mark.server
def test_24_conversations_equal_the_oracle_and_spread_over_the_language_servers(encoders, languages, oracle):
    jobs = [(f"Conversation {i}: what is in the image?", [image_bytes(48 + 8 * (i % 6), 64, 200 + i)], 12)
            for i in range(24)]
    before = started(languages)
    out, errors = {}, []

    def run(i):
        url = encoders[i % 2].grpc_url
        responses, error = request(url, *jobs[i])
        if error is not None:
            errors.append(error)
        out[i] = "".join(r.text for r in responses)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[0]
    for i, job in enumerate(jobs):
        assert out[i] == oracle.text(oracle.generate(*job)), i
    counts = [a - b for a, b in zip(started(languages), before)]
    assert sum(counts) == 24
    assert all(0.5 * 8 <= c <= 1.5 * 8 for c in counts), counts


def _long_requests(url_of, count, results, errors, progress):
    def run(i):
        arrays = Qwen3VLRequest(LONG_PROMPT, (), LONG, stream=True, conversation_id=f"long-{i}").arrays()
        got = []

        def note(result=None):
            progress[i] = progress.get(i, 0) + 1

        responses, error = stream_infer(None, arrays, url=url_of(i), model="qwen3vl_disagg", timeout=300,
                                        started=_Counter(note))
        if error is not None:
            errors.append(error.message())
        got = [Qwen3VLResponse.from_result(r) for r in responses]
        results[i] = got

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads


class _Counter:
    """stream_infer's `started` event, used to see that a stream has begun."""

    def __init__(self, note):
        self.note = note

    def set(self):
        self.note()


def _check_long(results, oracle, expected_ids):
    for i, responses in results.items():
        ids = np.concatenate([r.output_ids.reshape(-1) for r in responses]).tolist()
        assert ids == expected_ids, i  # no token lost or repeated
        assert "".join(r.text for r in responses) == oracle.text(expected_ids), i
        assert responses[-1].finish_reason in ("stop", "length")


@pytest.mark.server
def test_a_killed_language_server_hands_its_sequences_to_the_others(encoders, languages, oracle, tiny_checkpoint):
    expected = oracle.generate(LONG_PROMPT, [], LONG)
    moved = migrations(encoders)
    results, errors, progress = {}, [], {}
    threads = _long_requests(lambda i: encoders[i % 2].grpc_url, 15, results, errors, progress)
    gauges = lambda: [pool_metric(s, "qwen3vl_language_sequences", "language") for s in languages]  # noqa: E731
    assert wait_for(lambda: len(progress) == 15 and max(gauges()) >= 4, 120), (progress, gauges())
    index = int(np.argmax(gauges()))
    victim, held = languages[index], max(gauges())
    kill_hard(victim)
    victim.process.wait(30)
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(results) == 15
    _check_long(results, oracle, expected)
    assert migrations(encoders) - moved >= min(held, 4)
    # restarted on its ports, it takes new sequences once ready
    restarted = _restart(languages, index)
    assert wait_for(lambda: _serves(encoders, restarted), 60)


@pytest.fixture(scope="module")
def proxies(languages):
    """A TcpProxy in front of each language server's gRPC port: the network between an
    orchestrator and a language server, which a test can break while both processes live."""
    ps = [TcpProxy(s.grpc_url) for s in languages]
    yield ps
    for p in ps:
        p.close()


@pytest.fixture(scope="module")
def proxied_encoder(tiny_checkpoint, tmp_path_factory, proxies):
    """An encoder server whose qwen3vl_disagg reaches the language servers through `proxies`."""
    server = start_server(tiny_checkpoint, tmp_path_factory, "encoder", "pool-encoder-proxied",
                          language_urls=",".join(p.url for p in proxies), max_output_len=LONG, chunk_rows=64)
    yield server
    server.stop()


def test_the_proxy_resets_its_connections_and_accepts_new_ones():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as target:
        with TcpProxy(f"127.0.0.1:{target.getsockname()[1]}") as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            server, _ = target.accept()
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"
            assert proxy.cut() == 1
            for side in (client, server):  # both ends see a reset, not an orderly close
                with pytest.raises(ConnectionResetError):
                    side.recv(4)
                side.close()
            again = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            server, _ = target.accept()
            server.sendall(b"pong")
            assert again.recv(4) == b"pong"
            again.close()
            server.close()


def generating(server, before) -> int:
    """At least how many sequences generate on a language server now: its open ones less those
    started since `before` (its counters then: `language_counters`) that have not begun their
    generation (each begins it once: qwen3vl_language_prefills_total)."""
    started_now, prefills_now = language_counters(server)
    started_then, prefills_then = before
    return int(metric(server, "qwen3vl_language_sequences", "language")
               - ((started_now - started_then) - (prefills_now - prefills_then)))


def language_counters(server) -> tuple[float, float]:
    return (metric(server, "qwen3vl_language_sequences_started_total", "language"),
            metric(server, "qwen3vl_language_prefills_total", "language"))


@pytest.mark.server
def test_a_stream_broken_to_a_language_server_hands_its_sequences_to_the_others(proxied_encoder, proxies, languages,
                                                                                oracle):
    """The connection between the orchestrator and a language server breaks, both processes live:
    the sequences on it move to the other servers (the stream broke: a migration, as when the
    server dies), and the ones left behind on it are ended."""
    expected = oracle.generate(LONG_PROMPT, [], LONG)
    moved = migrations([proxied_encoder])
    before = [language_counters(s) for s in languages]
    results, errors, progress = {}, [], {}
    threads = _long_requests(lambda i: proxied_encoder.grpc_url, 15, results, errors, progress)
    # cut as soon as one server has 4 generating: the 15 begin over seconds on a loaded host, and
    # 1,200 tokens take few, so waiting for the last one to begin could find the first ones done
    counts = []

    def four_generate():
        counts[:] = [generating(s, b) for s, b in zip(languages, before)]
        return max(counts) >= 4

    assert wait_for(four_generate, 120), (counts, progress)
    index = int(np.argmax(counts))
    target = languages[index]
    assert proxies[index].cut() >= 1
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(results) == 15
    _check_long(results, oracle, expected)
    assert migrations([proxied_encoder]) - moved >= 4
    # the server behind the proxy lived through it, and kept nothing for the sequences it lost: they
    # were ended (the orchestrator sends END again over a new connection), not left open until their
    # generation's end and then the sequence expiry (60 s); nothing runs there any more
    assert target.process.poll() is None
    assert wait_for(lambda: metric(target, "qwen3vl_language_sequences", "language") == 0, 10)
    generated = metric(target, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm")
    time.sleep(1.0)
    assert metric(target, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm") == generated
    # and it takes new sequences through the proxy again
    assert wait_for(lambda: _serves([proxied_encoder], target), 60)


def kill_hard(server) -> None:
    """SIGKILL a tritonserver and its Python-backend stubs (by PID), as a dead host takes them all:
    stubs whose server was killed are not reaped by it and would outlive the test."""
    import psutil

    stubs = psutil.Process(server.process.pid).children(recursive=True)
    os.kill(server.process.pid, signal.SIGKILL)
    for stub in stubs:
        try:
            stub.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(stubs, timeout=10)


def _restart(languages, index):
    """Start languages[index] again on its ports (the fixture stops the new one)."""
    from qwen3vl_triton.serve.server import TritonServer

    old = languages[index]
    server = TritonServer(old.repository, old.ports, build_dir=old.build_dir, log_file=old.log_file,
                          extra_args=old.extra_args)
    server.start(timeout=300, log=lambda *_: None)
    languages[index] = server
    return server


def _serves(encoders, server):
    """Whether new conversations reach `server` (its started counter moves)."""
    before = metric(server, "qwen3vl_language_sequences_started_total", "language")
    for i in range(6):
        url = encoders[i % len(encoders)].grpc_url
        responses, error = request(url, "Hello again.", [], 4, conversation_id=f"new-{i}")
        assert error is None, error
    return metric(server, "qwen3vl_language_sequences_started_total", "language") > before


@pytest.mark.server
def test_a_draining_language_server_loses_nothing(encoders, languages, oracle):
    from qwen3vl_triton.serve.launcher import drain
    from qwen3vl_triton.transfer.receiver import DRAIN_FILE

    expected = oracle.generate(LONG_PROMPT, [], LONG)
    results, errors, progress = {}, [], {}
    threads = _long_requests(lambda i: encoders[i % 2].grpc_url, 9, results, errors, progress)
    gauges = lambda: [pool_metric(s, "qwen3vl_language_sequences", "language") for s in languages]  # noqa: E731
    assert wait_for(lambda: len(progress) == 9 and max(gauges()) >= 2, 120), (progress, gauges())
    index = int(np.argmax(gauges()))
    target = languages[index]
    before = metric(target, "qwen3vl_language_sequences_started_total", "language")
    lines, late = [], []

    def during():  # new sequences while it drains go elsewhere
        time.sleep(1.5)  # the model sees the drain within its 0.5 s housekeeping period, the pool within 0.25 s
        for i in range(4):
            late.append(request(encoders[i % 2].grpc_url, "During the drain.", [], 4, conversation_id=f"d-{i}")[1])

    other = threading.Thread(target=during)
    other.start()
    drain(target, target.repository, 120, log=lambda m, **_: lines.append(m))  # what SIGTERM does in qwen3vl-serve
    assert lines[-1].startswith("drained: 0 sequence(s) still open"), lines
    assert metric(target, "qwen3vl_language_sequences_started_total", "language") == before
    target.stop()  # then the launcher stops the server
    other.join(300)
    assert late == [None] * 4, late
    for t in threads:
        t.join(600)
    assert not errors, errors
    _check_long(results, oracle, expected)
    (target.repository / "language" / DRAIN_FILE).unlink()  # the launcher renders a new repository each start
    restarted = _restart(languages, index)
    assert wait_for(lambda: _serves(encoders, restarted), 60)


@pytest.mark.server
def test_the_openai_endpoint_on_the_encoder_topology(encoders, oracle):
    from openai import OpenAI

    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import OpenAIServer, free_ports
    from tests.conftest import SERVER_SETTINGS

    image = {"type": "image_url", "image_url": {"url": data_url(image_bytes(64, 80, 4))}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is in the picture?"}]}]
    ids = oracle.generate_messages(messages, 12)
    with OpenAIServer(encoders[0].grpc_url, "127.0.0.1", free_ports(1)[0],
                      Settings(**{**SERVER_SETTINGS, "max_output_len": LONG}), model="qwen3vl_disagg").start() as srv:
        client = OpenAI(base_url=f"http://{srv.url}/v1", api_key="unused")
        r = client.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=12, user="someone")
        assert r.choices[0].message.content == oracle.text(ids)
        assert r.usage.completion_tokens == len(ids)
        chunks = client.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=12, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == oracle.text(ids)


@pytest.mark.server
def test_a_killed_encoder_is_unavailable_and_the_client_retries_on_another(encoders, oracle):
    """Last: it kills the second encoder server."""
    expected = oracle.generate(LONG_PROMPT, [], LONG)
    dying, alive = encoders[1], encoders[0]
    with Client(dying.grpc_url, model="qwen3vl_disagg") as c:
        pieces = c.generate(LONG_PROMPT, max_tokens=LONG)
        next(pieces)
        kill_hard(dying)
        with pytest.raises(ClientError) as err:
            for _ in pieces:
                pass
    assert str(err.value.error.code) == "unavailable" and dying.grpc_url in str(err.value)
    dying.process.wait(30)
    with Client(f"{dying.grpc_url},{alive.grpc_url}", model="qwen3vl_disagg") as c:
        assert c.generate_text(LONG_PROMPT, max_tokens=LONG) == oracle.text(expected)


@pytest.mark.server
def test_a_conversations_next_turns_move_no_rows_of_its_earlier_images(encoders, languages, oracle):
    """A three-turn conversation through qwen3vl_disagg, an image in turn 1 and another in turn 3:
    every turn equals transformers' `generate`; turn 2 sends none of turn 1's image rows (the
    language server that held turn 1 keeps them), turn 3 only the new image's."""
    def image_part(raw):
        return {"type": "image_url", "image_url": {"url": data_url(raw)}}

    first, second = image_bytes(96, 64, 21), image_bytes(64, 96, 22)
    messages = [{"role": "user", "content": [image_part(first), {"type": "text", "text": "What is this?"}]}]
    with Disaggregated(encoders[0].grpc_url, languages[0].grpc_url) as d:
        rows_of = {name: d.encode(None, max_tokens=8, messages=[{"role": "user", "content": [image_part(raw)]}]).rows
                   for name, raw in (("first", first), ("second", second))}

    def skipped():
        return sum(metric(s, "qwen3vl_language_rows_skipped_total", "language") for s in languages)

    moved = []
    for turn, follow_up in enumerate([None, "And its colours?", [image_part(second), "Compare the two."]]):
        if follow_up is not None:
            content = (follow_up if isinstance(follow_up, str)
                       else [follow_up[0], {"type": "text", "text": follow_up[1]}])
            messages = [*messages, {"role": "user", "content": content}]
        before = skipped()
        responses, error = request(encoders[0].grpc_url, None, max_tokens=10, messages=messages)
        assert error is None, error
        ids = np.concatenate([r.output_ids.reshape(-1) for r in responses]).tolist()
        assert ids == oracle.generate_messages(messages, 10), f"turn {turn + 1}"
        moved.append(skipped() - before)
        messages = [*messages, {"role": "assistant", "content": oracle.text(ids)}]
    assert moved == [0, rows_of["first"], rows_of["first"]], moved


@pytest.mark.server
def test_sigterm_to_a_language_server_lets_its_generations_finish_then_it_exits(tiny_checkpoint, encoder_server,
                                                                                oracle, tmp_path):
    """`qwen3vl-serve --topology language` (the launcher process, as a pod runs it) gets SIGTERM
    while 3 long generations run on it: each ends whole and equal to the oracle, a new sequence is
    refused as draining, and the launcher exits 0, its tritonserver and stubs gone."""
    from types import SimpleNamespace

    import psutil

    from load_tests.spread import sequences_started
    from qwen3vl_triton.serve import cluster
    from qwen3vl_triton.serve.server import free_ports
    from qwen3vl_triton.transfer.sender import LanguageClient, TransferError

    member = cluster.Member("language", "drain-language", *free_ports(3))
    launch = SimpleNamespace(build_dir=str(tmp_path), admin_key=secrets.token_urlsafe(24), timeout=300,
                             checkpoint=str(tiny_checkpoint),
                             set=[f"max_output_len={LONG_TOKENS}", "drain_timeout_s=120"])
    cluster.start(member, cluster.launcher_command(member, launch, []), tmp_path / "launcher.log")
    try:
        cluster.wait_ready(member, time.monotonic() + 300)
        children = [p.pid for p in psutil.Process(member.pid).children(recursive=True)]
        url = f"127.0.0.1:{member.grpc}"
        expected = oracle.text(oracle.generate(LONG_PROMPT, [], LONG_TOKENS))
        texts, errors = {}, []

        def run(i):
            try:
                with Disaggregated(encoder_server.grpc_url, url) as d:
                    enc = d.encode(LONG_PROMPT, [], 8)  # max_tokens: the encoder's check only
                    texts[i] = "".join(d.run(enc, LONG_TOKENS))
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        probe = LanguageClient(url, timeout=10)
        try:
            # all three started (a start after SIGTERM is refused, which is the point), two under way
            assert wait_for(lambda: sequences_started([member.record()])[member.name] >= 3
                            and probe.load()[0] >= 2, 120), (probe.load(), errors, texts)
            member.process.send_signal(signal.SIGTERM)
            with Disaggregated(encoder_server.grpc_url, url, migration_limit=0) as d:
                time.sleep(1.0)  # the model sees the drain within its 0.5 s housekeeping period
                enc = d.encode("A new one.", [], 4)
                with pytest.raises(TransferError) as refused:
                    "".join(d.run(enc, 4))
            # refused as draining -- or, when the generations had ended already, by a server that stopped
            assert "draining" in str(refused.value) or member.process.poll() is not None, refused.value
        finally:
            probe.close()
        for t in threads:
            t.join(600)
        assert not errors, errors
        assert texts == {i: expected for i in range(3)}
        assert member.process.wait(120) == 0
        assert not [pid for pid in children if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    finally:
        if member.process.poll() is None:
            cluster.stop_all([member])
