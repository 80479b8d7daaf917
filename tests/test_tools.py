"""Triton's own tools against the served models, without the admin key: perf_analyzer with an image,
the TensorRT-LLM ensemble's optional inputs as genai-perf sends them, every public configuration
free of host paths, one declaration per tensor; and a stop that is quick and leaves nothing running."""

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest

from qwen3vl_triton.serve.server import free_ports
from tests.oracle import image_bytes

pytestmark = pytest.mark.server

MODELS = ("qwen3vl", "preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing", "encode", "language")


def _get_json(server, path):
    with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=30) as r:  # no admin key
        return json.loads(r.read())


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_perf_analyzer_measures_qwen3vl_with_an_image_without_the_admin_key(server, tmp_path):
    from load_tests.perf import PerfAnalyzerMissing, check, command, input_data

    try:
        check()
    except PerfAnalyzerMissing as exc:
        pytest.skip(str(exc))
    data = input_data(tmp_path / "input.json", image_bytes(96, 64, 3), max_tokens=4)
    # a window long enough for requests to complete in it on a loaded 2-core host (this checks that
    # the tool works, not how fast)
    out = subprocess.run(command(server.grpc_url, data, measurement_ms=6000, trials=3), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    throughput = float(out.stdout.split("Throughput:")[1].split("infer/sec")[0])
    assert throughput > 0, out.stdout
    assert "vision_encoder, version: 1" in out.stdout  # the image went through the encoder


@pytest.mark.parametrize("model", MODELS)
def test_every_configuration_is_open_and_names_no_host_path(model, server, tiny_checkpoint):
    import tritonclient.grpc as grpcclient

    config = _get_json(server, f"/v2/models/{model}/config")
    with grpcclient.InferenceServerClient(server.grpc_url) as c:  # gRPC too, without the key
        assert c.get_model_config(model, as_json=True)["config"]["name"] == model
    absolute = [s for s in _strings(config) if s.startswith("/") or str(tiny_checkpoint) in s]
    assert not absolute, f"{model}: {absolute}"
    if "checkpoint" in config.get("parameters", {}):
        assert config["parameters"]["checkpoint"]["string_value"] == "checkpoint"


@pytest.mark.parametrize("model", MODELS)
def test_public_metadata_lists_each_tensor_once(model, server):
    meta = _get_json(server, f"/v2/models/{model}")
    for kind in ("inputs", "outputs"):
        names = [t["name"] for t in meta[kind]]
        assert len(names) == len(set(names)), f"{model} {kind}: {names}"


# -- the TensorRT-LLM ensemble's optional inputs, as genai-perf's TensorRT-LLM mode sends them -----------
def genai_perf_request(prompt, max_tokens, stream=True, **extra):
    """genai-perf 0.0.16 `--endpoint-type kserve --backend tensorrtllm` (TensorRTLLMConverter): text_input,
    max_tokens, exclude_input_in_output true; min_length = max_tokens with
    --output-tokens-mean-deterministic; stream with --streaming; --extra-inputs as given. perf_analyzer
    adds the batch dimension."""
    payload = {"text_input": [prompt], "max_tokens": [max_tokens], "exclude_input_in_output": [True],
               "min_length": [max_tokens]}
    if stream:
        payload["stream"] = [True]
    payload.update({k: [v] for k, v in extra.items()})
    kinds = {str: np.object_, bool: np.bool_, int: np.int32, float: np.float32}
    return {k: np.array([[x.encode() if isinstance(x, str) else x for x in v]], kinds[type(v[0])])
            for k, v in payload.items()}


def stream_infer(server, arrays, timeout=120, url=None, started=None, model="qwen3vl"):
    """One request over a gRPC stream (as perf_analyzer sends it): its responses, or the error.
    `started` (an Event) is set once three responses came."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results = queue.Queue()
    inputs = []
    for name, value in arrays.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        inputs.append(t)
    with grpcclient.InferenceServerClient(url or server.grpc_url) as c:
        c.start_stream(callback=lambda result=None, error=None: results.put((result, error)))
        try:
            c.async_stream_infer(model, inputs, enable_empty_final_response=True)
            responses = []
            while True:
                result, error = results.get(timeout=timeout)
                if error is not None:
                    return responses, error
                final = result.get_response().parameters.get("triton_final_response")
                if result.get_response().outputs:
                    responses.append(result)
                if started is not None and len(responses) >= 3:
                    started.set()
                if final is not None and final.bool_param:
                    return responses, None
        finally:
            c.stop_stream()


@pytest.mark.parametrize("stream", [True, False])
def test_genai_perfs_tensorrtllm_request_is_served_as_the_oracle_generates(stream, server, oracle):
    prompt, n = "Prompt 6 about things", 16  # greedy, it ends after 4 tokens on its own
    assert len(oracle.generate(prompt, [], n)) < n
    expected = oracle.generate(prompt, [], n, min_new_tokens=n)  # min_length = max_tokens
    responses, error = stream_infer(server, genai_perf_request(prompt, n, stream=stream))
    assert error is None, error
    ids = [int(i) for r in responses for i in r.as_numpy("output_ids").reshape(-1)]
    text = "".join(t.decode() for r in responses for t in r.as_numpy("text_output").reshape(-1))
    assert ids == expected and len(ids) == n
    oracle.assert_served(text, ids)
    assert len(responses) == (n if stream else 1)


def test_the_neutral_values_of_the_other_optional_inputs_are_served(server, oracle):
    prompt, n = "Describe the sea.", 8
    arrays = genai_perf_request(prompt, n, beam_width=1, num_return_sequences=1, return_log_probs=False,
                                return_context_logits=False, return_generation_logits=False,
                                presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                                length_penalty=1.0, pad_id=0)
    arrays.pop("min_length")
    responses, error = stream_infer(server, arrays)
    assert error is None, error
    assert [int(i) for r in responses for i in r.as_numpy("output_ids").reshape(-1)] == oracle.generate(prompt, [], n)


@pytest.mark.parametrize("name, value, message", [
    ("beam_width", 4, "beam_width: must be 1 (beam search is not implemented here"),
    ("num_return_sequences", 2, "num_return_sequences: must be 1"),
    ("return_log_probs", True, "return_log_probs: true is not supported"),
    ("exclude_input_in_output", False, "exclude_input_in_output: false is not supported"),
])
def test_an_optional_input_that_asks_for_more_is_refused_by_name(name, value, message, server):
    arrays = genai_perf_request("Hello", 8, **{name: value})
    responses, error = stream_infer(server, arrays)
    assert not responses and error is not None
    assert message in error.message(), error
    responses, error = stream_infer(server, genai_perf_request("Hello", 4))  # the server goes on serving
    assert error is None and responses


def test_beam_width_4_over_http_generate_stream_is_an_invalid_argument(server):
    body = json.dumps({"text_input": "Hello", "max_tokens": 8, "exclude_input_in_output": True, "beam_width": 4})
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3vl/generate_stream", body.encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    assert (status, "beam_width: must be 1" in text) == (400, True), (status, text)


# -- stopping ------------------------------------------------------------------------------------------
def _serve(checkpoint, tmp_path):
    http, grpc, metrics, openai = free_ports(4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--checkpoint", str(checkpoint), "--topology", "all",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--openai-port",
         str(openai), "--build-dir", str(tmp_path), "--set", "max_output_len=2000", "--set", "max_seq_len=2048"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("ready:", "error:")):
            break
    assert lines and lines[-1].startswith("ready:"), "".join(lines)
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
    return proc, grpc


@pytest.mark.parametrize("sig, state", [(signal.SIGINT, "idle"), (signal.SIGTERM, "generating")])
def test_a_server_stops_quickly_and_leaves_nothing_running(sig, state, tiny_checkpoint, tmp_path):
    proc, grpc = _serve(tiny_checkpoint, tmp_path)
    try:
        processes = psutil.Process(proc.pid).children(recursive=True)  # tritonserver, its stubs, the OpenAI server
        assert len(processes) >= 7
        ended, started = queue.Queue(), threading.Event()
        if state == "generating":  # 2,000 tokens (min_length = max_tokens): it runs on well past the stop
            arrays = genai_perf_request("Tell me about the ocean.", 2000)
            threading.Thread(target=lambda: ended.put(stream_infer(None, arrays, url=f"127.0.0.1:{grpc}",
                                                                   started=started)), daemon=True).start()
            assert started.wait(120) and ended.empty()
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        seconds = time.monotonic() - t0
        gone, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
        print(f"{state} stop on {signal.Signals(sig).name}: {seconds:.1f}s")
        assert seconds < 15, f"the stop took {seconds:.1f}s"  # a generous bound: 2 shared cores
        if state == "generating":
            responses, error = ended.get(timeout=10)
            assert error is not None and "the server is stopping" in error.message(), error
            assert len(responses) < 2000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
