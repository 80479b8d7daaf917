"""The single-server ensemble `qwen3vl` through the real tritonserver, against the oracle."""

import base64
import json
import queue
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import Client, ClientError
from tests.conftest import LONG_PROMPT, LONG_TOKENS
from tests.oracle import image_bytes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(each_runner_server):
    """Every test of this module on each CPU runner's server (ggml: the default; torch: the reference)."""
    return each_runner_server


def metrics(server) -> str:
    with urllib.request.urlopen(f"http://{server.address}:{server.ports.metrics}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(server, name, model) -> float:
    pattern = re.compile(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.e+-]+)$', re.M)
    values = [float(v) for v in pattern.findall(metrics(server))]
    return sum(values)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


CASES = [
    ("one image", "Describe this image in short.", [image_bytes(100, 150, 1)], 24),
    ("two images", "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3, fmt="JPEG")], 30),
    ("text only", "Tell me about the ocean.", [], 40),
]


@pytest.mark.parametrize("name, prompt, images, n", CASES, ids=[c[0] for c in CASES])
def test_grpc_streaming_equals_the_oracle(name, prompt, images, n, server, oracle):
    with Client(server.grpc_url, "grpc") as c:
        pieces = list(c.generate(prompt, images, max_tokens=n))
    oracle.assert_served("".join(pieces), oracle.generate(prompt, images, n))


@pytest.mark.parametrize("name, prompt, images, n", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_http_generate_stream_with_a_json_body_equals_the_oracle(name, prompt, images, n, server, oracle):
    body = {"id": f"http-{name}", "text_input": prompt, "max_tokens": n, "stream": True,
            "image": [base64.b64encode(i).decode() for i in images]}
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3vl/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [json.loads(line[5:]) for line in resp.read().splitlines() if line.startswith(b"data:")]
    assert events and all("error" not in e for e in events)
    oracle.assert_served("".join(e["text_output"] for e in events), oracle.generate(prompt, images, n))


def test_data_url_image_and_non_streaming(server, oracle):
    img = image_bytes(90, 70, 21, fmt="WEBP")
    with Client(server.http_url, "http") as c:
        pieces = list(c.generate("What is it?", ["data:image/webp;base64," + base64.b64encode(img).decode()],
                                 max_tokens=20, stream=False))
    assert len(pieces) == 1
    oracle.assert_served(pieces[0], oracle.generate("What is it?", [img], 20))


def test_eight_concurrent_requests_each_equal_their_oracle_and_are_batched(server, oracle):
    jobs = [(f"Picture {i}: what do you see?", [image_bytes(64 + 24 * i, 80 + 8 * i, 30 + i)] * (1 + i % 2), 10 + 3 * i)
            for i in range(8)]
    steps_before = metric(server, "qwen3vl_engine_batched_steps_total", "tensorrt_llm")
    results = [None] * len(jobs)

    def run(i, prompt, images, n):
        with Client(server.grpc_url, "grpc") as c:
            results[i] = c.generate_text(prompt, images, max_tokens=n)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (prompt, images, n), got in zip(jobs, results):
        oracle.assert_served(got, oracle.generate(prompt, images, n))
    assert metric(server, "qwen3vl_engine_batched_steps_total", "tensorrt_llm") > steps_before





def engine_counts(server):
    """(running sequences, generated tokens so far, generated tokens now) of the engine, once idle."""
    running = lambda: metric(server, "qwen3vl_engine_running_sequences", "tensorrt_llm")  # noqa: E731
    generated = lambda: metric(server, "qwen3vl_engine_generated_tokens_total", "tensorrt_llm")  # noqa: E731
    assert wait_for(lambda: running() == 0, timeout=60)
    return running, generated, generated()


def assert_stopped_before_its_end(running, generated, before, length=LONG_TOKENS):
    """The one generation since `before` freed its place and did not run all `length` tokens."""
    assert wait_for(lambda: running() == 0, timeout=10), "the sequence still holds its engine slot"
    assert wait_for(lambda: generated() > before, timeout=10)  # the counters are sent when idle
    assert generated() - before < length, f"the generation ran to its end ({generated() - before} tokens)"


def test_a_stream_left_early_is_stopped_by_its_generation_id(long_server, oracle):
    """Triton 2.51 does not cancel an ensemble step that is already running: a tritonclient caller
    that leaves a `qwen3vl` stream ends the generation with tensorrt_llm's `stop`, sent with the
    stream's `generation_id` as the request id."""
    server = long_server
    assert len(oracle.generate(LONG_PROMPT, [], LONG_TOKENS)) == LONG_TOKENS  # it would run all of them
    running, generated, before = engine_counts(server)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    inputs = [
        grpcclient.InferInput("text_input", [1, 1], "BYTES"),
        grpcclient.InferInput("max_tokens", [1, 1], "INT32"),
        grpcclient.InferInput("stream", [1, 1], "BOOL"),
    ]
    inputs[0].set_data_from_numpy(np.array([[LONG_PROMPT.encode()]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[LONG_TOKENS]], np.int32))
    inputs[2].set_data_from_numpy(np.array([[True]]))
    client.async_stream_infer("qwen3vl", inputs, request_id="to-cancel")
    result, error = got.get(timeout=60)  # the first token arrived: it is running
    assert error is None
    generation = result.as_numpy("generation_id").reshape(-1)[0].decode()
    client.stop_stream(cancel_requests=True)
    client.close()
    stop = [
        grpcclient.InferInput(name, [1, 1], "INT32") for name in ("input_ids", "input_lengths", "request_output_len")
    ]
    for t in stop:
        t.set_data_from_numpy(np.ones((1, 1), np.int32))
    stop.append(grpcclient.InferInput("stop", [1, 1], "BOOL"))
    stop[-1].set_data_from_numpy(np.array([[True]]))
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        done = queue.Queue()
        c.start_stream(callback=lambda result, error: done.put(error))
        c.async_stream_infer("tensorrt_llm", stop, request_id=generation, enable_empty_final_response=True)
        assert done.get(timeout=30) is None
        c.stop_stream()
    assert_stopped_before_its_end(running, generated, before)
    with Client(server.grpc_url, "grpc") as c:
        assert c.generate_text("Next one.", max_tokens=4) is not None


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_library_stops_a_generation_it_leaves(protocol, long_server, oracle):
    server = long_server
    assert len(oracle.generate(LONG_PROMPT, [], LONG_TOKENS)) == LONG_TOKENS
    running, generated, before = engine_counts(server)
    with Client(server.grpc_url if protocol == "grpc" else server.http_url, protocol) as c:
        pieces = c.generate(LONG_PROMPT, max_tokens=LONG_TOKENS)
        for _ in range(3):
            next(pieces)
        pieces.close()  # the caller leaves after three pieces
    assert_stopped_before_its_end(running, generated, before)


def test_metrics_count_successes_and_failures(server):
    ok = metric(server, "nv_inference_request_success", "qwen3vl")
    bad = metric(server, "nv_inference_request_failure", "qwen3vl")
    with Client(server.grpc_url, "grpc") as c:
        c.generate_text("Count me.", max_tokens=3)
        with pytest.raises(ClientError):
            c.generate_text("Count me too.", max_tokens=0)
    assert wait_for(lambda: metric(server, "nv_inference_request_success", "qwen3vl") >= ok + 1)
    assert wait_for(lambda: metric(server, "nv_inference_request_failure", "qwen3vl") >= bad + 1)


def test_seeded_sampling_through_the_ensemble_is_reproducible(server):
    with Client(server.grpc_url, "grpc") as c:
        def run(seed):
            return c.generate_text("Tell me a story.", max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)

        first = run(11)
        assert run(11) == first
        assert len({first, run(12), run(13)}) > 1


def test_metrics_name_the_engine_that_serves(server):
    (labels,) = re.findall(r"^qwen3vl_engine_info\{([^}]*)\} 1$", metrics(server), re.M)
    assert {'model="tensorrt_llm"', f'runner="{server.runner}"', 'dtype="float32"'} <= set(labels.split(","))


def test_a_served_conversation_reuses_its_earlier_turns_and_equals_the_oracle(server, oracle):
    from tests.oracle import data_url

    def user(text, image=None):
        parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
        return {"role": "user", "content": parts + [{"type": "text", "text": text}]}

    messages = [user("What is in this picture?", image_bytes(256, 128, 41))]
    follow = [user("And what colour is it?"), user("Compare it with this one.", image_bytes(128, 192, 42))]
    hits = []
    with Client(server.grpc_url, "grpc") as c:
        for turn in range(3):
            before = metric(server, "qwen3vl_prefix_cache_hit_tokens_total", "tensorrt_llm")
            served = "".join(c.chat(messages, max_tokens=12))
            ids = oracle.generate_messages(messages, 12)
            oracle.assert_served(served, ids)
            assert wait_for(lambda: metric(server, "qwen3vl_engine_running_sequences", "tensorrt_llm") == 0)
            hits.append(metric(server, "qwen3vl_prefix_cache_hit_tokens_total", "tensorrt_llm") - before)
            if turn < 2:
                messages = messages + [{"role": "assistant", "content": served}, follow[turn]]
    assert hits[1] > 0 and hits[2] > 0, hits
    assert metric(server, "qwen3vl_prefix_cache_bytes", "tensorrt_llm") > 0
