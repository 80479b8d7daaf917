"""The engine through the real server: bad numbers in a `tensorrt_llm` request get one
INVALID_ARG error naming the input, and a request whose sampling would overflow disturbs none of
the streams decoding beside it."""

import threading

import numpy as np
import pytest

from client import Client
from tests.test_server_errors import stream_once, tensor

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(each_runner_server):
    """Every test of this module on each CPU runner's server (ggml: the default; torch: the reference)."""
    return each_runner_server


def llm_request(spec, table=None, cos_sin=None, delta=None, max_tokens=4):
    """A direct `tensorrt_llm` request: a short prompt with one image token when a table is given."""
    ids = [1, 2, 3] + ([spec.vocab_size] if table is not None else []) + [4]
    inputs = [tensor("input_ids", np.array([ids], np.int32), "INT32"),
              tensor("input_lengths", np.array([[len(ids)]], np.int32), "INT32"),
              tensor("request_output_len", np.array([[max_tokens]], np.int32), "INT32")]
    if table is not None:
        inputs += [tensor("prompt_embedding_table", table[None].astype(np.float32), "FP32"),
                   tensor("prompt_vocab_size", np.array([[table.shape[0]]], np.int32), "INT32")]
    if cos_sin is not None:
        inputs.append(tensor("mrope_rotary_cos_sin", cos_sin[None].astype(np.float32), "FP32"))
    if delta is not None:
        inputs.append(tensor("mrope_position_deltas", np.array([[delta]], np.int64), "INT64"))
    return inputs


def image_table(spec, value):
    table = np.zeros(((spec.deepstack_levels + 1), spec.hidden_size), np.float32)  # stride 1: one image token
    table[0, 0] = value
    return table


BAD = {
    "NaN in the prompt table": (lambda spec: llm_request(spec, table=image_table(spec, np.nan)),
                                "prompt_embedding_table: holds NaN or infinite values"),
    "Inf in the prompt table": (lambda spec: llm_request(spec, table=image_table(spec, np.inf)),
                                "prompt_embedding_table: holds NaN or infinite values"),
    "NaN in the rotary table": (lambda spec: llm_request(spec, cos_sin=np.full(5 * spec.rotary_dim, np.nan)),
                                "mrope_rotary_cos_sin: must hold cosines and sines: finite values in [-1, 1]"),
    "position delta 2^63-1": (lambda spec: llm_request(spec, delta=2**63 - 1),
                              "mrope_position_deltas: must be in [-4, "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_numbers_get_one_invalid_arg_error_naming_the_input(case, server, spec):
    make, message = BAD[case]
    results, errors = stream_once(server, "tensorrt_llm", make(spec))
    assert not results and len(errors) == 1
    assert errors[0].message() == message or errors[0].message().startswith(message)
    _, errors = stream_once(server, "tensorrt_llm", llm_request(spec))  # still serving
    assert not errors


def test_a_vanishing_temperature_disturbs_no_stream_beside_it(server, oracle):
    # temperature 1e-45 (float32's smallest) makes logits / temperature overflow; the sampler
    # turned that into NaN probabilities and raised, failing every stream in the batch.
    texts, prompts = {}, [f"Running along {i}." for i in range(3)]

    def run(i, **kw):
        with Client(server.grpc_url, "grpc") as c:
            texts[i] = c.generate_text(prompts[i] if i < 3 else "Tiny temperature.", max_tokens=40, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=run, args=(3,), kwargs={"temperature": 1e-45}))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(3):
        oracle.assert_served(texts[i], oracle.generate(prompts[i], [], 40))
    # with every other logit divided into -inf, the sampler can only pick the best token
    oracle.assert_served(texts[3], oracle.generate("Tiny temperature.", [], 40))
