"""One request never changes what another receives, and the servers refuse what they should,
before any work: batched models isolate a bad request, stream state is the server's own, byte
bounds come first, and the vision encoder called directly refuses what the ensemble would."""

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import Client
from tests.conftest import SERVER_SETTINGS
from tests.oracle import image_bytes
from tests.test_server_errors import stream_once, tensor

pytestmark = pytest.mark.server


def vision_inputs(ids, pixels, grid):
    return [tensor("input_ids", np.asarray(ids, np.int32)[None], "INT32"),
            tensor("pixel_values", np.asarray(pixels, np.float32)[None], "FP32"),
            tensor("image_grid_thw", np.asarray(grid, np.int64)[None], "INT64")]


def call_vision(server, inputs):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.infer("vision_encoder", inputs).as_numpy("prompt_embedding_table")
    except Exception as exc:  # noqa: BLE001 -- the outcome is what is checked
        return exc
    finally:
        client.close()


def permuted(ids, spec):
    """The same image-token ids, in another order (each still present once)."""
    ids = ids.copy()
    fake = np.flatnonzero(ids >= spec.vocab_size)
    ids[fake[:2]] = ids[fake[:2]][::-1]
    return ids


def test_a_request_with_permuted_image_ids_fails_alone_in_its_batch(server, spec, preprocessor):
    p = preprocessor("Look.", [image_bytes(64, 64, 40)])
    outcomes = [None] * 8

    def send(i):
        ids = p.input_ids if i % 2 == 0 else permuted(p.input_ids, spec)
        outcomes[i] = call_vision(server, vision_inputs(ids, p.pixel_values, p.image_grid_thw))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    good = outcomes[0::2]
    assert all(isinstance(t, np.ndarray) for t in good), good
    assert all(np.array_equal(t, good[0]) for t in good)
    for bad in outcomes[1::2]:
        assert isinstance(bad, Exception) and "input_ids: image-token ids out of order" in str(bad), bad
        assert "StatusCode.INVALID_ARGUMENT" in str(bad.status())


def test_a_batch_that_fails_inside_the_encoder_is_retried_request_by_request(encoder, spec, preprocessor):
    """A failure the per-request checks did not catch (here: checks bypassed) reaches its request only."""
    from qwen3vl_triton.model.vision import EncodeRequest, encode_request_from_arrays

    p = preprocessor("Look.", [image_bytes(64, 64, 41)])
    good = encode_request_from_arrays({"input_ids": p.input_ids, "pixel_values": p.pixel_values,
                                       "image_grid_thw": p.image_grid_thw}, spec)
    bad = EncodeRequest(permuted(p.input_ids, spec), p.pixel_values, p.image_grid_thw)
    with pytest.raises(ValueError):
        encoder.encode([good, bad])
    results = encoder.encode_each([good, bad, good])
    assert isinstance(results[1], ValueError)
    alone = encoder.encode([good])[0].prompt_embedding_table
    for r in (results[0], results[2]):
        assert np.array_equal(r.prompt_embedding_table.numpy(), alone.numpy())


def test_bad_requests_in_a_preprocessing_batch_fail_alone(server, oracle):
    out = [None] * 6

    def run(i):
        images = [image_bytes(40, 40, 50 + i)] if i % 2 == 0 else [b"\x89PNG\r\n\x1a\n broken"]
        try:
            with Client(server.grpc_url) as c:
                out[i] = c.generate_text(f"Batch {i}.", images, max_tokens=5)
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in range(0, 6, 2):
        assert out[i] == oracle.text(oracle.generate(f"Batch {i}.", [image_bytes(40, 40, 50 + i)], 5))
    for i in range(1, 6, 2):
        assert "image[0]: cannot be decoded" in str(out[i])


def _http_stream(server, body):
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3vl/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        events = [json.loads(line[5:]) for line in resp.read().splitlines() if line.startswith(b"data:")]
    return "".join(e["text_output"] for e in events)


# prompts whose greedy answers split UTF-8 characters across tokens (U+FFFD in a per-token decode)
SPLITTING = ["Count the circles.", "Write a haiku about mountains.", "hello", "Read the text on the sign."]


def test_two_clients_with_the_same_request_id_do_not_share_a_detokenizer(server, oracle, spec):
    out = {}

    def run(k, prompt):
        out[k] = _http_stream(server, {"id": "1", "text_input": prompt, "max_tokens": 40, "stream": True})

    jobs = [(k, p) for k, p in enumerate(SPLITTING * 2)]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for k, prompt in jobs:
        assert out[k] == oracle.text(oracle.generate(prompt, [], 40)), prompt


def test_an_8_mb_prompt_is_refused_before_any_work(server):
    prompt = np.array([[b"word " * (8 * 2**20 // 5)]], dtype=np.object_)
    t0 = time.perf_counter()
    _, errors = stream_once(server, "qwen3vl", [tensor("text_input", prompt, "BYTES"),
                                                tensor("max_tokens", np.array([[4]], np.int32), "INT32")])
    elapsed = time.perf_counter() - t0
    assert len(errors) == 1 and "text_input: is 8388605 bytes, above the limit of 32768" in errors[0].message()
    assert elapsed < 3.0, f"refused after {elapsed:.1f} s"  # tokenizing it took 26 s


def test_an_image_above_the_byte_bound_is_refused_before_decoding(server):
    big = image_bytes(32, 32) + bytes(21 * 2**20)  # a valid PNG header, 21 MiB
    _, errors = stream_once(server, "qwen3vl", [
        tensor("text_input", np.array([[b"Look."]], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([[4]], np.int32), "INT32"),
        tensor("image", np.array([[big]], dtype=np.object_), "BYTES")])
    assert len(errors) == 1 and f"image[0]: is {len(big)} bytes, above the limit of {20 * 2**20}" \
        in errors[0].message()


def test_messages_text_above_the_bound_is_refused(server):
    messages = json.dumps([{"role": "user", "content": "x" * 40_000}]).encode()
    _, errors = stream_once(server, "qwen3vl", [tensor("messages", np.array([[messages]], np.object_), "BYTES"),
                                                tensor("max_tokens", np.array([[4]], np.int32), "INT32")])
    assert len(errors) == 1 and "messages: the text is 40000 bytes, above the limit of 32768" in errors[0].message()


def test_the_vision_encoder_refuses_an_image_16x_the_pixel_bound(server, spec):
    side = 4 * int(np.sqrt(spec.max_pixels / spec.patch_size ** 2)) // spec.spatial_merge_size * \
        spec.spatial_merge_size  # 16x the pixels
    patches = side * side
    tokens = patches // spec.spatial_merge_size ** 2
    ids = np.concatenate([[1, 2], spec.vocab_size + np.arange(tokens), [3]])
    pixels = np.zeros((patches, 3 * spec.temporal_patch_size * spec.patch_size ** 2), np.float32)
    out = call_vision(server, vision_inputs(ids, pixels, [[1, side, side]]))
    assert isinstance(out, Exception)
    # a block is an image or a video's frame group: the bounds of either (the server's max_videos)
    from qwen3vl_triton.model.vision import block_bounds
    from qwen3vl_triton.serve.repository import Settings

    _, low, high = block_bounds(spec, SERVER_SETTINGS["max_images"], Settings().max_videos)
    assert patches * spec.patch_size ** 2 > high >= spec.max_pixels and low <= spec.min_pixels
    assert f"image_grid_thw: image 0 is {side}x{side} patches = {patches * spec.patch_size ** 2} pixels, outside " \
           f"the checkpoint's [{low}, {high}]" in str(out)


def test_the_vision_encoder_refuses_non_finite_pixels(server, spec, preprocessor):
    p = preprocessor("Look.", [image_bytes(64, 64, 42)])
    pixels = p.pixel_values.copy()
    pixels[3, 5] = np.nan
    out = call_vision(server, vision_inputs(p.input_ids, pixels, p.image_grid_thw))
    assert isinstance(out, Exception) and "pixel_values: holds NaN or infinite values" in str(out)
