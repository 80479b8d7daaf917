"""Checkpoints as transformers' `save_pretrained` writes them, served through the real server.

Each layout is written by transformers (model, tokenizer, image processor, generation config),
passes the pre-flight check, and is served -- through the `qwen3vl` ensemble and the
disaggregated `encode` -> `language` path of one server -- exactly as transformers' own
generate (tests/oracle.py, fp32 greedy). generation_config.json lists three end ids, one of them
a token the model emits early, so every path must stop at an end id other than the end of turn.
The hub layout (tiny.build_checkpoint) is served the same way by tests/test_server.py and
tests/test_disagg.py.
"""

import json

import pytest
from transformers import GenerationConfig

from client import Client
from qwen3vl_triton.model.check import check_checkpoint
from qwen3vl_triton.model.tiny import build_saved_checkpoint
from qwen3vl_triton.transfer.sender import Disaggregated
from tests.conftest import start_server
from tests.oracle import Oracle, image_bytes

pytestmark = pytest.mark.server

LAYOUTS = {
    # transformers 5's own layout (num_local_experts, rope_parameters, [E, out, in] experts,
    # chat_template.jinja), a dense layer among MoE layers, DeepStack from other vision blocks
    "saved": dict(mlp_only_layers=[1], deepstack_visual_indexes=[0, 2, 4]),
    # sharded behind an index, bfloat16 (served upcast to float32), tied embeddings, MoE on every
    # other layer, two DeepStack levels
    "sharded-bf16-tied": dict(dtype="bfloat16", max_shard_size="200KB", tie_word_embeddings=True,
                              decoder_sparse_step=2, mlp_only_layers=[], deepstack_visual_indexes=[1, 3]),
}
IMAGE_CASE = ("Describe this image in short.", [image_bytes(100, 150, 1)], 16)
TEXT_CASE = ("Tell me about the ocean.", [], 16)


def _add_an_early_end_id(path):
    """List, after the end of turn and <|endoftext|>, a token the model generates early (the first
    one not generated before it, in the image case or else the text case) as an end id of
    generation_config.json; return it and the case that stops there."""
    oracle = Oracle(path)
    for prompt, images, n in (IMAGE_CASE, TEXT_CASE):
        ids = oracle.generate(prompt, images, n)
        fresh = [k for k in range(1, len(ids)) if ids[k] not in ids[:k] and ids[k] not in oracle.end_ids]
        if fresh:
            config = GenerationConfig.from_pretrained(str(path))
            config.eos_token_id = [*oracle.end_ids, ids[fresh[0]]]
            config.save_pretrained(str(path))
            return ids[fresh[0]], (prompt, images, n)
    raise AssertionError("the random model repeats one token in both cases")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    """(name, checkpoint, extra end id, the case that stops there, oracle, server) of one layout;
    one server at a time."""
    name = request.param
    path = build_saved_checkpoint(tmp_path_factory.mktemp("layout") / name, log=lambda *_: None, **LAYOUTS[name])
    extra, stopping = _add_an_early_end_id(path)
    server = start_server(path, tmp_path_factory, "all", f"server-{name}")
    yield name, path, extra, stopping, Oracle(path), server
    server.stop()


def test_the_files_are_transformers_own_layout(layout):
    name, path, extra, _, _, _ = layout
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    assert "num_local_experts" in text and "num_experts" not in text  # not the hub's key
    assert "rope_parameters" in text and "rope_scaling" not in text
    assert (path / "chat_template.jinja").is_file()
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"][-1] == extra
    assert (path / "model.safetensors.index.json").is_file() == (name == "sharded-bf16-tied")


def test_the_check_passes_and_reports_the_layout(layout):
    name, path, extra, _, oracle, _ = layout
    report = check_checkpoint(path)
    assert report.ok, report.text()
    facts = dict(report.facts)
    assert facts["end ids"].endswith(f"{extra} {oracle.tokenizer.convert_ids_to_tokens(extra)}")
    if name == "saved":
        assert facts["MoE layers"].startswith("3 of 4: 0, 2-3; dense: 1")
        assert facts["DeepStack"].startswith("3 levels from vision blocks [0, 2, 4]")
    else:
        assert facts["MoE layers"].startswith("2 of 4: 1, 3; dense: 0, 2 (decoder_sparse_step 2")
        assert facts["DeepStack"].startswith("2 levels")
        assert "tied embeddings True" in facts["language model"] and facts["dtype"].startswith("bfloat16")


@pytest.mark.parametrize("case", [IMAGE_CASE, TEXT_CASE], ids=["image", "text"])
def test_the_ensemble_serves_the_oracle(case, layout):
    _, _, extra, stopping, oracle, server = layout
    prompt, images, n = case
    expected = oracle.generate(prompt, images, n)
    if case == stopping:
        assert expected[-1] == extra and len(expected) < n  # the oracle stops at the extra end id
    with Client(server.grpc_url, "grpc") as c:
        served = "".join(c.generate(prompt, images, max_tokens=n))
    oracle.assert_served(served, expected)


def test_the_disaggregated_path_serves_the_oracle_and_stops_at_the_extra_end_id(layout):
    _, _, extra, stopping, oracle, server = layout
    prompt, images, n = stopping
    with Disaggregated(server.grpc_url, server.grpc_url, chunk_rows=16) as d:
        enc = d.encode(prompt, images, n)
        d.transfer(7, enc, n)
        pieces = list(d.stream(7))
        d.lang.end(7)
    ids = [i for _, chunk in pieces for i in chunk]
    assert ids == oracle.generate(prompt, images, n)
    assert ids[-1] == extra
    assert "".join(text for text, _ in pieces) == oracle.text(ids)
