"""Conversations through the real servers: the OpenAI-compatible endpoint with the official
`openai` client, `qwen3vl` messages over gRPC and HTTP, and the disaggregated path; against
transformers' generate on the same conversation."""

import base64
import json
import socket
import threading
import urllib.error
import urllib.request

import openai
import pytest

from client import Client, Conversation
from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.serve.server import OpenAIServer, free_ports
from qwen3vl_triton.transfer.sender import Disaggregated
from tests.conftest import LONG_PROMPT, LONG_TOKENS, SERVER_SETTINGS
from tests.oracle import data_url, image_bytes, openai_to_template
from tests.test_server import assert_stopped_before_its_end, engine_counts, metric, wait_for

pytestmark = pytest.mark.server

IMG1, IMG2 = image_bytes(100, 150, 1), image_bytes(64, 96, 3, fmt="JPEG")
CONVERSATION = [  # a system prompt, an image in the first and in a later turn, an assistant turn
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMG1)}},
                                 {"type": "text", "text": "Describe this image in short."}]},
    {"role": "assistant", "content": "A small red house next to a tall green tree."},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                 {"type": "image_url", "image_url": {"url": data_url(IMG2, "jpeg")}}]},
]
ENDS = [{"role": "user", "content": "Which of the two images is brighter?"}]  # greedy ends with the end token


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    settings = Settings(**SERVER_SETTINGS, image_url_hosts="images.invalid")
    srv = OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], settings,
                       log_file=tmp_path_factory.mktemp("openai") / "openai.log").start()
    yield srv
    srv.stop()


@pytest.fixture
def oai(api):
    with openai.OpenAI(base_url=f"http://{api.url}/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def expect(oracle, messages, n, end_ids):
    ids = oracle.generate_messages(messages, n)
    finish = "stop" if ids and ids[-1] in end_ids else "length"
    prompt = oracle.conversation_inputs(*openai_to_template(messages))
    return oracle.text(ids), finish, len(ids), prompt.input_ids.shape[1]


@pytest.mark.parametrize("messages, n", [(CONVERSATION, 24), (ENDS, 64)], ids=["two images, cut by length", "ends"])
def test_chat_completion_equals_the_oracle(messages, n, oai, oracle, spec):
    text, finish, completion, prompt = expect(oracle, messages, n, spec.end_ids)
    r = oai.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=n, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (prompt, completion, prompt + completion)


@pytest.mark.parametrize("messages, n", [(CONVERSATION, 24), (ENDS, 64)], ids=["two images, cut by length", "ends"])
def test_streamed_chat_completion_equals_the_oracle(messages, n, oai, oracle, spec):
    text, finish, completion, prompt = expect(oracle, messages, n, spec.end_ids)
    chunks = list(oai.chat.completions.create(model="qwen3vl", messages=messages, max_completion_tokens=n,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (prompt, completion)


def test_models_lists_the_model(oai):
    assert [m.id for m in oai.models.list().data] == ["qwen3vl"]
    assert oai.models.retrieve("qwen3vl").id == "qwen3vl"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.body["param"] == "model"


def test_unknown_paths_answer_openai_errors_and_no_docs_are_published(api):
    def get(path):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{api.url}{path}", timeout=30)
        return err.value.code, json.loads(err.value.read())["error"]

    for path in ("/v1/completions", "/docs", "/openapi.json", "/redoc"):
        status, error = get(path)
        assert status == 404 and error["type"] == "not_found_error" and error["code"] is None, (path, error)
    status, error = get("/v1/chat/completions")
    assert status == 405 and error["type"] == "invalid_request_error", error


def test_a_developer_message_is_a_system_message(oai, oracle):
    """The OpenAI API's newer name for the system role is served as the system role."""
    as_system = oracle.text(oracle.generate_messages([{"role": "system", "content": "Answer briefly."}, *ENDS], 8))
    r = oai.chat.completions.create(model="qwen3vl", max_tokens=8,
                                    messages=[{"role": "developer", "content": "Answer briefly."}, *ENDS])
    assert r.choices[0].message.content == as_system


def test_a_conversation_continued_turn_by_turn(oai, oracle):
    conv = Conversation(system="You are a careful assistant.")
    conv.user("Describe this image in short.", [IMG1])
    first = oai.chat.completions.create(model="qwen3vl", messages=conv.messages, max_tokens=8).choices[0].message
    conv.assistant(first.content).user("And this one?", [IMG2])
    second = oai.chat.completions.create(model="qwen3vl", messages=conv.messages, max_tokens=12)
    assert second.choices[0].message.content == oracle.text(oracle.generate_messages(conv.messages, 12))


def test_the_same_conversation_through_every_path(server, encoder_server, language_server, oai, oracle):
    """qwen3vl messages over gRPC and HTTP generate_stream, the OpenAI endpoint, the disaggregated
    path driven by the client (Disaggregated.generate): one text."""
    n = 20
    want = oracle.text(oracle.generate_messages(CONVERSATION, n))
    with Client(server.grpc_url, "grpc") as c:
        assert "".join(c.chat(CONVERSATION, n)) == want
    with Client(server.http_url, "http") as c:
        assert "".join(c.chat(CONVERSATION, n)) == want
    assert oai.chat.completions.create(model="qwen3vl", messages=CONVERSATION, max_tokens=n).choices[0] \
        .message.content == want
    with Disaggregated(encoder_server.grpc_url, language_server.grpc_url, transport="grpc") as d:
        assert "".join(d.generate(messages=CONVERSATION, max_tokens=n)) == want


@pytest.fixture(scope="module")
def relay_encoder(tiny_checkpoint, tmp_path_factory, language_server):
    """An encoder server whose qwen3vl_disagg sends tables to the language server itself."""
    from tests.conftest import start_server

    srv = start_server(
        tiny_checkpoint, tmp_path_factory, "encoder", "relay-chat", language_url=language_server.grpc_url
    )
    yield srv
    srv.stop()


def test_the_same_conversation_through_qwen3vl_disagg(relay_encoder, oracle):
    n = 20
    with Client(relay_encoder.grpc_url, "grpc", model="qwen3vl_disagg") as c:
        assert "".join(c.chat(CONVERSATION, n)) == oracle.text(oracle.generate_messages(CONVERSATION, n))


def test_stop_strings_end_the_text_before_them(oai, oracle):
    full = oracle.text(oracle.generate_messages(ENDS, 64))
    stop = full[10:14]  # a string that first appears inside the text (maybe across tokens)
    cut = full[:full.index(stop)]
    r = oai.chat.completions.create(model="qwen3vl", messages=ENDS, max_tokens=64, stop=[stop, "never seen"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = list(oai.chat.completions.create(model="qwen3vl", messages=ENDS, max_tokens=64, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


BAD = {
    "n > 1": (dict(n=2), 400, "n"),
    "unknown model": (dict(model="gpt-4o"), 404, "model"),
    "unknown role": (dict(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    "remote image URL": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/x.png"}}]}]),
        400, "messages[0].content[0].image_url"),
    "corrupt image": (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}]),
        400, "messages[0].content[0].image_url"),
    "max_tokens 0": (dict(max_tokens=0), 400, "max_tokens"),
    "temperature out of range": (dict(temperature=3.5), 400, "temperature"),
    "empty stop string": (dict(stop=""), 400, "stop"),
    # features this server does not implement are refused, not silently ignored
    "tools": (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
              400, "tools"),
    "logprobs": (dict(logprobs=True, top_logprobs=2), 400, "logprobs"),
    "json mode": (dict(response_format={"type": "json_object"}), 400, "response_format"),
    "frequency penalty": (dict(frequency_penalty=0.5), 400, "frequency_penalty"),
}


@pytest.mark.parametrize("field, value", [("temperature", "NaN"), ("top_p", "Infinity"), ("max_tokens", "-Infinity")])
def test_non_finite_numbers_are_refused_by_name(api, field, value):
    """Python's JSON reader takes NaN and Infinity (the official client never sends them)."""
    body = ('{"model": "qwen3vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
            f'"{field}": {value}}}').encode()
    request = urllib.request.Request(f"http://{api.url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    error = json.loads(err.value.read())["error"]
    assert err.value.code == 400 and error["param"] == field and error["message"].startswith(f"{field}: "), error


def test_fields_clients_send_by_default_are_accepted(oai, oracle):
    """The values that ask for nothing (LangChain and others send them) are not refused."""
    r = oai.chat.completions.create(model="qwen3vl", messages=ENDS, max_tokens=6, n=1, logprobs=False,
                                    frequency_penalty=0, presence_penalty=0.0, response_format={"type": "text"},
                                    tool_choice="none", user="someone")
    assert r.choices[0].message.content == oracle.text(oracle.generate_messages(ENDS, 6))


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_one_clear_error(case, oai, oracle):
    kw, status, param = BAD[case]
    request = {"model": "qwen3vl", "messages": ENDS, "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as err:
        oai.chat.completions.create(**request)
    assert err.value.status_code == status
    body = err.value.body
    assert body["param"] == param and param.split("[")[0] in body["message"], body
    # the server keeps serving
    r = oai.chat.completions.create(model="qwen3vl", messages=ENDS, max_tokens=6)
    assert r.choices[0].message.content == oracle.text(oracle.generate_messages(ENDS, 6))


def test_a_repeated_image_is_a_cache_hit(server, oai):
    hits = lambda: metric(server, "qwen3vl_vision_cache_hits_total", "vision_encoder")  # noqa: E731
    misses = lambda: metric(server, "qwen3vl_vision_cache_misses_total", "vision_encoder")  # noqa: E731
    img = image_bytes(120, 90, 77)  # an image no other test sends
    conv = Conversation().user("Describe it.", [img])
    h0, m0 = hits(), misses()
    first = oai.chat.completions.create(model="qwen3vl", messages=conv.messages, max_tokens=4).choices[0].message
    assert wait_for(lambda: misses() == m0 + 1) and hits() == h0
    conv.assistant(first.content).user("Say more.")
    oai.chat.completions.create(model="qwen3vl", messages=conv.messages, max_tokens=4)
    assert wait_for(lambda: hits() == h0 + 1)
    assert misses() == m0 + 1  # the second turn did not run the tower for it
    assert metric(server, "qwen3vl_vision_cache_bytes", "vision_encoder") > 0


LONG = [{"role": "user", "content": LONG_PROMPT}]


@pytest.fixture(scope="module")
def long_api(long_server, tmp_path_factory):
    """The OpenAI endpoint over the server that admits long generations."""
    settings = Settings(**{**SERVER_SETTINGS, "max_output_len": LONG_TOKENS + 36})
    srv = OpenAIServer(long_server.grpc_url, "127.0.0.1", free_ports(1)[0], settings,
                       log_file=tmp_path_factory.mktemp("openai-long") / "openai.log").start()
    yield srv
    srv.stop()


def test_a_client_that_drops_a_stream_ends_its_generation(long_server, long_api, oracle):
    server, api = long_server, long_api
    assert len(oracle.generate_messages(LONG, LONG_TOKENS)) == LONG_TOKENS  # it would run all of them
    running, generated, before = engine_counts(server)
    body = json.dumps({"model": "qwen3vl", "messages": LONG, "max_tokens": LONG_TOKENS, "stream": True}).encode()
    req = urllib.request.Request(f"http://{api.url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    for _ in range(3):  # the generation is running
        assert resp.readline()
    resp.close()  # drop the connection mid-stream
    assert_stopped_before_its_end(running, generated, before)


def test_a_client_that_leaves_a_non_streamed_request_ends_its_generation(long_server, long_api, oracle):
    server, api = long_server, long_api
    assert len(oracle.generate_messages(LONG, LONG_TOKENS)) == LONG_TOKENS
    running, generated, before = engine_counts(server)
    body = json.dumps({"model": "qwen3vl", "messages": LONG, "max_tokens": LONG_TOKENS}).encode()
    host, port = api.url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: running() >= 1, timeout=10)
    # the client is gone before its answer
    assert_stopped_before_its_end(running, generated, before)


def test_concurrent_conversations_each_equal_their_oracle(oai, oracle):
    jobs = [([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes(
        64 + 16 * i, 80, 200 + i))}}, {"type": "text", "text": f"Picture {i}?"}]}], 6 + i) for i in range(4)]
    got = [None] * len(jobs)

    def run(i):
        got[i] = oai.chat.completions.create(model="qwen3vl", messages=jobs[i][0], max_tokens=jobs[i][1]) \
            .choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (messages, n), text in zip(jobs, got):
        assert text == oracle.text(oracle.generate_messages(messages, n))


def test_locust_openai_user_smoke_run(api, tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    from load_tests.run import read_stats
    from tests.conftest import ROOT

    cmd = [sys.executable, "-m", "load_tests.run", "--users", "2", "--duration", "12", "--stop-timeout", "30",
           "--grace", "60", "--url", "127.0.0.1:1", "--openai-url", api.url, "--checkpoint", str(tiny_checkpoint),
           "--max-tokens", "8", "--reports", str(tmp_path), "--prefix", "openai", "OpenAIChatUser"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = read_stats(tmp_path / "openai_stats.csv")
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
    for name in ("generate", "ttft", "itl"):
        assert int(stats[("OpenAI", name)]["Request Count"]) > 0, f"no OpenAI {name} entries"
    assert "Traceback" not in proc.stderr


def test_a_model_server_that_is_down_is_a_503(tmp_path):
    """No tritonserver behind the endpoint: requests and /health answer 503 with an OpenAI error."""
    dead = free_ports(1)[0]
    with OpenAIServer(f"127.0.0.1:{dead}", "127.0.0.1", free_ports(1)[0], Settings(**SERVER_SETTINGS),
                      log_file=tmp_path / "openai.log") as srv:
        with openai.OpenAI(base_url=f"http://{srv.url}/v1", api_key="none", max_retries=0, timeout=30) as c:
            with pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(model="qwen3vl", messages=ENDS, max_tokens=4)
        assert err.value.status_code == 503 and err.value.body["type"] == "service_unavailable"
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://{srv.url}/health", timeout=10)
        assert health.value.code == 503
