"""Bad input through the real server: one INVALID_ARG error naming the input; serving continues."""

import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import Client
from tests.oracle import image_bytes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(each_runner_server):
    """Every test of this module on each CPU runner's server (ggml: the default; torch: the reference)."""
    return each_runner_server


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def stream_once(server, model, inputs):
    """Send one streaming request; return (texts, errors) once the stream is final."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    results, errors = [], []
    try:
        while True:
            result, error = got.get(timeout=120)
            if error is not None:
                errors.append(error)
                break
            results.append(result)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return results, errors


def good_inputs(prompt="Hello.", max_tokens=4):
    return [tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
            tensor("max_tokens", np.array([[max_tokens]], np.int32), "INT32")]


def images_input(images):
    return tensor("image", np.array([images], dtype=np.object_), "BYTES")


BAD = {
    "corrupt image": (lambda: good_inputs() + [images_input([b"\x89PNG\r\n\x1a\n garbage"])],
                      "image[0]: cannot be decoded"),
    "second image corrupt": (lambda: good_inputs() + [images_input([image_bytes(32, 32), b"nope"])],
                             "image[1]: cannot be decoded"),
    "wrong dtype": (lambda: [good_inputs()[0], tensor("max_tokens", np.array([[4.0]], np.float32), "FP32")],
                    "max_tokens"),
    "wrong shape": (lambda: [tensor("text_input", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES"),
                             good_inputs()[1]], "text_input"),
    "missing text_input": (lambda: [good_inputs()[1]], "text_input"),
    "max_tokens zero": (lambda: good_inputs(max_tokens=0), "max_tokens: must be in [1, 256], got 0"),
    "max_tokens negative": (lambda: good_inputs(max_tokens=-3), "max_tokens: must be in [1, 256], got -3"),
    "max_tokens above the limit": (lambda: good_inputs(max_tokens=257), "max_tokens: must be in [1, 256], got 257"),
    "too many images": (lambda: good_inputs() + [images_input([image_bytes(32, 32)] * 5)],
                        "image: 5 images given, at most 4 are allowed"),
    "image above the pixel limit": (lambda: good_inputs() + [images_input([image_bytes(1100, 1000)])],
                                    "image[0]: is 1100x1000 = 1100000 pixels, above the limit of 1000000"),
    "text not UTF-8": (lambda: [tensor("text_input", np.array([[b"\xff\xfe"]], dtype=np.object_), "BYTES"),
                                good_inputs()[1]], "text_input: is not valid UTF-8"),
    "bad top_p": (lambda: good_inputs() + [tensor("top_p", np.array([[1.5]], np.float32), "FP32")],
                  "top_p: must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_invalid_arg_error_naming_it(case, server, oracle):
    make, message = BAD[case]
    results, errors = stream_once(server, "qwen3vl", make())
    assert len(errors) == 1 and not [r for r in results if r.get_response().outputs]
    assert message in errors[0].message()

    with Client(server.grpc_url, "grpc") as c:  # the server keeps serving
        oracle.assert_served(
            c.generate_text("After an error.", max_tokens=6), oracle.generate("After an error.", [], 6)
        )


HTTP_BAD = {
    "max_tokens zero": ({"text_input": "x", "max_tokens": 0}, "max_tokens: must be in [1, 256], got 0"),
    "corrupt base64 image": (
        {"text_input": "x", "max_tokens": 4, "image": ["bm9wZQ=="]},
        "image[0]: cannot be decoded",
    ),
    "bad data URL": (
        {"text_input": "x", "max_tokens": 4, "image": ["data:image/png,xyz"]},
        "image[0]: a data URL must look like",
    ),
    "too many images": ({"text_input": "x", "max_tokens": 4, "image": ["eA=="] * 5}, "image: 5 images given"),
    "missing text_input": ({"max_tokens": 4}, "text_input: is required (or messages)"),
}


@pytest.mark.parametrize("case", list(HTTP_BAD))
def test_http_bad_input_is_a_400_naming_the_input(case, server):
    import json
    import urllib.error
    import urllib.request

    body, message = HTTP_BAD[case]
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3vl/generate_stream",
                                 data=json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400  # INVALID_ARG
    assert message in err.value.read().decode()


def test_an_error_in_one_request_does_not_fail_the_others_batched_with_it(server, spec, preprocessor):
    """Concurrent direct requests to the batched vision encoder, half of them inconsistent."""
    p = preprocessor("Look.", [image_bytes(64, 64, 40)])
    outcomes = {}

    def send(i):
        pixels = p.pixel_values if i % 2 == 0 else p.pixel_values[:-4]  # odd ones: patch count mismatch
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            res = client.infer("vision_encoder", [
                tensor("input_ids", p.input_ids[None], "INT32"),
                tensor("pixel_values", pixels[None], "FP32"),
                tensor("image_grid_thw", p.image_grid_thw[None], "INT64")])
            outcomes[i] = res.as_numpy("prompt_embedding_table")
        except Exception as exc:  # noqa: BLE001 -- the outcome is what is checked
            outcomes[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tables = [outcomes[i] for i in range(0, 8, 2)]
    assert all(isinstance(t, np.ndarray) for t in tables)
    assert all(np.array_equal(t, tables[0]) for t in tables)
    for i in range(1, 8, 2):
        assert "pixel_values: has" in str(outcomes[i]) and "image_grid_thw describes" in str(outcomes[i])


def test_a_bad_llm_request_does_not_disturb_running_ones(server, oracle):
    """A malformed direct `tensorrt_llm` request while ensemble requests decode."""
    texts = {}

    def good(i):
        with Client(server.grpc_url, "grpc") as c:
            texts[i] = c.generate_text(f"Running {i}.", max_tokens=30)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    bad = [tensor("input_ids", np.array([[1, 2, 99999]], np.int32), "INT32"),
           tensor("input_lengths", np.array([[3]], np.int32), "INT32"),
           tensor("request_output_len", np.array([[5]], np.int32), "INT32")]
    _, errors = stream_once(server, "tensorrt_llm", bad)
    for t in threads:
        t.join(120)
    assert len(errors) == 1 and "input_ids: id 99999 is neither a vocabulary id" in errors[0].message()
    for i in range(3):
        oracle.assert_served(texts[i], oracle.generate(f"Running {i}.", [], 30))
