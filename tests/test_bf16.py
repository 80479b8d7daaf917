"""bfloat16 serving on CPU (`dtype=bfloat16`): vision encoder, prompt table and engine in bf16,
tables crossing Triton as TYPE_BF16. In bf16 a random tiny model flips near-tied greedy tokens,
so correctness is teacher-forced against the fp32 oracle: at every position of the oracle's own
generations, the served bf16 engine's argmax must agree with the oracle's at least as often as
transformers' own bf16 model does on the same inputs."""

import queue

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from client import Client
from qwen3vl_triton.arrays import BFLOAT16
from qwen3vl_triton.model import mrope
from qwen3vl_triton.transfer.sender import Disaggregated
from tests.conftest import start_server
from tests.oracle import image_bytes

pytestmark = pytest.mark.server

PROMPTS = [("Describe this image.", [image_bytes(100, 150, 1)]), ("Tell me about the ocean.", []),
           ("Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3)]),
           ("Write a long story.", []), ("What is in the picture?", [image_bytes(128, 96, 20)]),
           ("Prompt 7 about things", []), ("Request number 3: what do you see?", [image_bytes(160, 96, 13)]),
           ("Say something.", [image_bytes(80, 80, 11)]), ("Which is brighter?", [image_bytes(48, 256, 4)])]
TOKENS = 32


@pytest.fixture(scope="module")
def bf16_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(tiny_checkpoint, tmp_path_factory, "all", "bf16", dtype="bfloat16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf_bf16(tiny_checkpoint):
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16).eval()


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def served_argmax(client, spec, prompt, images, forced):
    """The served engine's greedy token after the prompt and each prefix of `forced`: the prompt
    goes through `encode` (preprocessing and the bf16 vision encoder), then one `tensorrt_llm`
    request per prefix, asking for one token."""
    inputs = [tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
              tensor("max_tokens", np.array([[TOKENS]], np.int32), "INT32")]
    if images:
        inputs.append(tensor("image", np.array([images], dtype=np.object_), "BYTES"))
    enc = client.infer("encode", inputs)
    ids, table = enc.as_numpy("input_ids").reshape(-1), enc.as_numpy("prompt_embedding_table")
    assert enc.get_output("prompt_embedding_table").datatype == "BF16" and table.dtype == BFLOAT16
    delta = int(enc.as_numpy("mrope_position_deltas").reshape(-1)[0])
    prompt_cos_sin = enc.as_numpy("mrope_rotary_cos_sin").reshape(-1)
    # the forced tokens are text: all three M-RoPE rows at position + delta
    cos, sin = mrope.text_cos_sin(torch.arange(ids.size, ids.size + len(forced)) + delta, spec)
    cos_sin = np.concatenate([prompt_cos_sin, torch.stack((cos, sin), -1).reshape(-1).numpy()])
    got = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for j in range(len(forced)):  # one stream, one request per prefix (tensorrt_llm is decoupled)
            prefix = np.concatenate([ids, np.asarray(forced[:j], np.int32)]).astype(np.int32)
            client.async_stream_infer("tensorrt_llm", [
                tensor("input_ids", prefix[None], "INT32"),
                tensor("input_lengths", np.array([[prefix.size]], np.int32), "INT32"),
                tensor("request_output_len", np.array([[1]], np.int32), "INT32"),
                tensor("prompt_embedding_table", table, "BF16"),
                tensor("prompt_vocab_size", np.array([[table.shape[1]]], np.int32), "INT32"),
                tensor("mrope_rotary_cos_sin", cos_sin[None, :prefix.size * spec.rotary_dim].astype(np.float32),
                       "FP32"),
                tensor("mrope_position_deltas", np.array([[delta]], np.int64), "INT64")], request_id=str(j))
        tokens = {}
        while len(tokens) < len(forced):
            result, error = got.get(timeout=120)
            assert error is None, error
            tokens[int(result.get_response().id)] = int(result.as_numpy("output_ids").reshape(-1)[0])
    finally:
        client.stop_stream()
    return [tokens[j] for j in range(len(forced))]


def reference_argmax(model, oracle, prompt, images, forced, dtype):
    """transformers' argmax at the prompt's last position and after each prefix of `forced`."""
    inp = oracle.inputs(prompt, images)
    kw = inp.kwargs()
    kw["input_ids"] = torch.cat([inp.input_ids, torch.tensor([forced[:-1]])], dim=1)
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    kw["mm_token_type_ids"] = torch.cat(
        [inp.mm_token_type_ids, torch.zeros((1, len(forced) - 1), dtype=torch.int32)], 1
    )
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(dtype)
    with torch.inference_mode():
        logits = model(**kw).logits[0, inp.input_ids.shape[1] - 1:]
    return logits.float().argmax(-1).tolist()


def test_served_bf16_agrees_with_the_fp32_oracle_as_often_as_transformers_bf16(bf16_server, spec, oracle, hf_bf16):
    client = grpcclient.InferenceServerClient(bf16_server.grpc_url)
    served = hf = total = 0
    try:
        for prompt, images in PROMPTS:
            forced = oracle.generate(prompt, images, TOKENS)
            truth = reference_argmax(oracle.model, oracle, prompt, images, forced, torch.float32)
            ours = served_argmax(client, spec, prompt, images, forced)
            theirs = reference_argmax(hf_bf16, oracle, prompt, images, forced, torch.bfloat16)
            served += sum(a == b for a, b in zip(ours, truth))
            hf += sum(a == b for a, b in zip(theirs, truth))
            total += len(truth)
    finally:
        client.close()
    assert total >= 120 and served >= hf, f"served bf16 {served}/{total}, transformers bf16 {hf}/{total}"


def test_bf16_streams_through_the_ensemble_and_the_disaggregated_path(bf16_server):
    # Free-running bf16 greedy output may leave the fp32 oracle's at a near-tie; every path
    # serving the same bf16 engine gives the same tokens (the ensemble cannot show a character
    # cut by max_tokens: the one may be a prefix of the other).
    prompt, images = PROMPTS[0]
    with Client(bf16_server.grpc_url, "grpc") as c:
        streamed = "".join(c.generate(prompt, images, max_tokens=TOKENS))
    texts = {}
    for transport in ("grpc", "shm"):
        with Disaggregated(bf16_server.grpc_url, bf16_server.grpc_url, transport=transport, chunk_rows=16) as d:
            texts[transport] = "".join(d.generate(prompt, images, max_tokens=TOKENS))
    assert streamed and texts["grpc"] == texts["shm"]
    assert texts["grpc"].startswith(streamed) or streamed.startswith(texts["grpc"])
