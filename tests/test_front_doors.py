"""The OpenAI endpoint's front door against large and slow clients, through the real servers: a body
over the limit is refused before it is read (Content-Length, Expect: 100-continue) or at the limit
(chunked); a request the model would refuse is refused without being forwarded; slow headers and
bodies are closed in their time; connections past the bound are turned away. Resident memory of every
server process (tritonserver, each stub, the OpenAI server) is measured before, at the peak and after
(load_tests/front_doors.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from load_tests.front_doors import MemoryWatch, MiB, chat_body, generate_body, send_body, server_processes, slow_clients
from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.serve.server import OpenAIServer, free_ports, port_free
from tests.conftest import ROOT, SERVER_SETTINGS

pytestmark = pytest.mark.server

LIMIT = Settings().max_request_bytes  # the default: 64 MiB
HEADER_S, BODY_S = 2.0, 3.0
SETTLED_MIB = 50  # every process within this of where it started, once a refused request is done
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    settings = Settings(**SERVER_SETTINGS, openai_header_timeout_ms=int(HEADER_S * 1e3),
                        openai_body_timeout_ms=int(BODY_S * 1e3))
    srv = OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], settings,
                       log_file=tmp_path_factory.mktemp("front") / "openai.log").start()
    yield srv
    srv.stop()


@pytest.fixture
def processes(server, api):
    return server_processes(server, api)


def show(mem: MemoryWatch) -> str:
    return "\n".join(f"{name:<24} before {r['before']:8.1f}  peak {r['peak']:8.1f}  after {r['after']:8.1f} MiB"
                     for name, r in mem.rows().items())


def refuse(api, processes, size, mode="length", clients=1):
    """Send `clients` bodies of `size` filler bytes at once; the answers and the memory watch."""
    prefix, suffix = chat_body(size)
    answers = [None] * clients
    with MemoryWatch(processes) as mem:
        def one(i):
            answers[i] = send_body(api.url, PATH, prefix, size, suffix, mode)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(0.3)
    mem.settle(2.0)
    print(show(mem))
    return answers, mem, len(prefix) + size + len(suffix)


def assert_settled(mem: MemoryWatch):
    name, grew = mem.worst("after")
    assert grew < SETTLED_MIB, f"{name} holds {grew:.0f} MiB more than before\n{show(mem)}"


def assert_peak_below(mem: MemoryWatch, mib: float, names=None):
    for name in names or mem.processes:
        grew = mem.peak[name] - mem.before[name]
        assert grew < mib, f"{name} peaked {grew:.0f} MiB above its start\n{show(mem)}"


def error(answer) -> dict:
    return json.loads(answer.body)["error"]


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(api, processes):
    (answer,), mem, total = refuse(api, processes, 200 * MiB)
    assert answer.status == 413, answer
    assert error(answer)["message"] == f"request: is {total} bytes, above the limit of {LIMIT}"
    assert error(answer)["type"] == "invalid_request_error"
    assert answer.seconds < 2.0, answer.seconds
    assert_peak_below(mem, 16)  # nothing was read into any process
    assert_settled(mem)


def test_expect_100_continue_over_the_limit_gets_413_and_no_100_continue(api, processes):
    (answer,), mem, total = refuse(api, processes, 200 * MiB, mode="expect")
    assert answer.interim == [] and answer.status == 413 and answer.sent == 0, answer
    assert error(answer)["message"] == f"request: is {total} bytes, above the limit of {LIMIT}"
    assert_peak_below(mem, 16)
    assert_settled(mem)


def test_a_chunked_body_is_refused_at_the_limit(api, processes):
    (answer,), mem, _ = refuse(api, processes, 200 * MiB, mode="chunked")
    assert answer.status == 413, answer
    assert error(answer)["message"].startswith(f"request: the body is over the limit of {LIMIT} bytes (")
    assert_peak_below(mem, 16, [n for n in mem.processes if n != "openai"])  # nothing was forwarded
    assert_peak_below(mem, LIMIT / MiB * 1.25 + 32, ["openai"])  # at most the limit was held
    assert_settled(mem)


def test_a_request_the_model_would_refuse_is_refused_without_being_forwarded(api, processes):
    """60 MiB, under the body limit, with one image over the image limit: the endpoint reads and
    parses it (about twice its size at the peak) but forwards nothing."""
    (answer,), mem, _ = refuse(api, processes, 60 * MiB)
    assert answer.status == 400, answer
    assert error(answer)["message"] == ("messages[0].content[0].image_url: is 47185920 bytes, above the limit of "
                                        f"{Settings().max_image_bytes}")
    assert error(answer)["param"] == "messages[0].content[0].image_url"
    assert_peak_below(mem, 16, [n for n in mem.processes if n != "openai"])
    assert_peak_below(mem, 2.5 * 60 + 32, ["openai"])
    assert_settled(mem)


def test_a_burst_of_refused_large_bodies_leaves_every_process_where_it_started(api, processes):
    answers, mem, _ = refuse(api, processes, 200 * MiB, clients=4)
    assert [a.status for a in answers] == [413] * 4, answers
    assert_peak_below(mem, 16)
    assert_settled(mem)
    answers, mem, _ = refuse(api, processes, 60 * MiB, clients=4)
    assert [a.status for a in answers] == [400] * 4, answers
    assert_peak_below(mem, 16, [n for n in mem.processes if n != "openai"])
    assert_settled(mem)


def test_slow_headers_are_answered_408_and_closed_in_their_time(api):
    result = slow_clients(api.url, 200, "headers", watch=HEADER_S + 6)
    print(result)
    assert result["closed"] == 200 and result["refused_at_connect"] == 0, result
    assert HEADER_S - 0.1 <= result["first_closed_s"] and result["last_closed_s"] <= HEADER_S + 2.5, result
    host, port = api.url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        head, _, body = s.recv(4096).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["message"] == f"the request's headers did not arrive within {HEADER_S:g} s"


def test_slow_bodies_are_answered_408_and_closed_in_their_time(api):
    result = slow_clients(api.url, 200, "body", watch=BODY_S + 6)
    print(result)
    assert result["closed"] == 200 and result["refused_at_connect"] == 0, result
    assert BODY_S - 0.1 <= result["first_closed_s"] and result["last_closed_s"] <= BODY_S + 2.5, result
    host, port = api.url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        head, _, body = s.recv(4096).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["message"] == f"the request's body did not arrive within {BODY_S:g} s"


def test_connections_past_the_bound_are_answered_503_and_closed(server, tmp_path):
    settings = Settings(**SERVER_SETTINGS, openai_max_connections=8)
    with OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], settings,
                      log_file=tmp_path / "openai.log") as srv:
        host, port = srv.url.rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
        try:
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                head, _, body = extra.recv(4096).partition(b"\r\n\r\n")
                assert extra.recv(10) == b""  # closed
            assert head.startswith(b"HTTP/1.1 503 ")
            assert json.loads(body)["error"]["message"] == ("the server has 8 connections open, its limit: try "
                                                            "again later")
        finally:
            for s in held:
                s.close()
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://{srv.url}/v1/models", timeout=30) as resp:  # room again
            assert resp.status == 200


def test_bodies_past_the_budget_are_answered_503_before_they_are_read(server, tmp_path):
    """openai_body_budget_bytes bounds the bodies of all requests in flight: one request holding
    60 MiB of a 100 MiB budget, a second of 60 MiB is turned away (503, Retry-After) unread; once the
    first is gone, it is admitted (and refused by the model's image bound)."""
    budget = 100 * MiB
    settings = Settings(**SERVER_SETTINGS, openai_body_budget_bytes=budget)
    prefix, suffix = chat_body(60 * MiB)
    total = len(prefix) + 60 * MiB + len(suffix)
    with OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], settings,
                      log_file=tmp_path / "openai.log") as srv:
        host, port = srv.url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as first:  # sends part of its body, waits
            first.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode() + prefix)
            time.sleep(0.5)
            second = send_body(srv.url, PATH, prefix, 60 * MiB, suffix)
        assert second.status == 503, second
        assert error(second)["message"] == (f"the server holds {total} bytes of other requests' bodies, its budget "
                                            f"is {budget}: try again shortly")
        time.sleep(0.5)
        third = send_body(srv.url, PATH, prefix, 60 * MiB, suffix)
        assert third.status == 400 and error(third)["param"] == "messages[0].content[0].image_url", third


def test_the_endpoint_keeps_serving(api, oracle):
    messages = [{"role": "user", "content": "After the front door tests."}]
    req = urllib.request.Request(f"http://{api.url}{PATH}", json.dumps(
        {"model": "qwen3vl", "messages": messages, "max_tokens": 6}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        text = json.loads(resp.read())["choices"][0]["message"]["content"]
    assert text == oracle.text(oracle.generate_messages(messages, 6))


# -- Triton's own HTTP endpoint, behind the compose file's nginx front ------------------------------------
@pytest.fixture(scope="module")
def nginx_front(server, tmp_path_factory):
    """nginx with docker/nginx/triton-http.conf.template (as the compose *-http services fill it) in
    front of the session server's HTTP port, on 127.0.0.1."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if nginx is None:
        pytest.skip("nginx is not installed (make tools installs it as root with apt-get)")
    base = tmp_path_factory.mktemp("nginx")
    port = free_ports(1)[0]
    template = (ROOT / "docker" / "nginx" / "triton-http.conf.template").read_text()
    front = template.replace("${QWEN3VL_TRITON}", server.http_url).replace("${QWEN3VL_MAX_BODY}", "64m") \
        .replace("listen 8000;", f"listen 127.0.0.1:{port};")
    (base / "front.conf").write_text(front)
    temps = " ".join(f"{kind}_temp_path {base}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                      "scgi"))
    (base / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "") + f"worker_processes 1; pid {base}/nginx.pid; "
        f"error_log {base}/error.log; daemon off;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; {temps} include {base}/front.conf; }}\n")
    proc = subprocess.Popen([nginx, "-p", str(base), "-c", str(base / "nginx.conf")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(base / "stderr.log", "wb"))
    deadline = time.monotonic() + 20
    while port_free("127.0.0.1", port) and time.monotonic() < deadline:
        assert proc.poll() is None, (base / "stderr.log").read_text()
        time.sleep(0.1)
    yield f"127.0.0.1:{port}", proc
    proc.send_signal(signal.SIGQUIT)  # graceful stop of the master and its worker
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def front_processes(server, nginx_front) -> dict:
    import psutil

    out = server_processes(server)
    master = psutil.Process(nginx_front[1].pid)
    out["nginx"] = master
    for i, worker in enumerate(master.children()):
        out[f"nginx worker {i}"] = worker
    return out


@pytest.mark.parametrize("mode", ["length", "expect", "chunked"])
def test_the_compose_front_refuses_a_large_body_before_triton_reads_it(mode, server, nginx_front):
    url, _ = nginx_front
    prefix, suffix = generate_body()
    with MemoryWatch(front_processes(server, nginx_front)) as mem:
        answer = send_body(url, "/v2/models/qwen3vl/generate_stream", prefix, 200 * MiB, suffix, mode)
        time.sleep(0.3)
    mem.settle(2.0)
    print(show(mem))
    assert answer.status == 413 and "413 Request Entity Too Large" in answer.body, answer
    assert answer.interim == [], answer  # no 100 Continue for a body that is refused
    if mode != "chunked":
        assert answer.seconds < 2.0, answer
    assert_peak_below(mem, 16)  # tritonserver and its stubs saw nothing; nginx buffers at most 1 MiB
    assert_settled(mem)


def test_the_compose_front_passes_a_streamed_generation(server, nginx_front, oracle):
    url, _ = nginx_front
    req = urllib.request.Request(f"http://{url}/v2/models/qwen3vl/generate_stream",
                                 json.dumps({"text_input": "Through the front.", "max_tokens": 6}).encode())
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [json.loads(line[len(b"data: "):]) for line in resp.read().splitlines() if line.startswith(b"data: ")]
    oracle.assert_served("".join(e["text_output"] for e in events), oracle.generate("Through the front.", [], 6))
