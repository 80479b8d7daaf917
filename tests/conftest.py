import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `client` and `tests.oracle` import from the checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny checkpoint, built once per test session from the default seed."""
    from qwen3vl_triton.model.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", profile="tiny", seed=0, log=lambda *_: None)


@pytest.fixture(scope="session")
def spec(tiny_checkpoint):
    from qwen3vl_triton.model.checkpoint import ModelSpec

    return ModelSpec.load(tiny_checkpoint)


@pytest.fixture(scope="session")
def oracle(tiny_checkpoint):
    from tests.oracle import Oracle

    return Oracle(tiny_checkpoint)


@pytest.fixture(scope="session")
def preprocessor(spec):
    from qwen3vl_triton.text.preprocess import Preprocessor

    return Preprocessor(spec, max_images=4, max_input_len=2048)


@pytest.fixture(scope="session")
def encoder(spec):
    from qwen3vl_triton.model.vision import VisionEncoder

    return VisionEncoder(spec)


@pytest.fixture(scope="session")
def engine(spec):
    from qwen3vl_triton.engine.engine import Engine

    eng = Engine(spec, max_batch=8, max_seq_len=2048, max_output_len=256)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def pipeline(preprocessor, encoder, spec):
    """prompt + images -> engine Request, through the package's preprocessing and encoder."""
    from qwen3vl_triton.engine.scheduler import Request
    from qwen3vl_triton.model.vision import EncodeRequest

    def make(prompt, images, max_new_tokens=24, **kw):
        p = preprocessor(prompt, images)
        r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        return Request(p.input_ids, max_new_tokens, end_id=spec.end_id, stop_ids=spec.end_ids,
                       table=r.prompt_embedding_table, mrope_cos_sin=r.mrope_rotary_cos_sin,
                       mrope_delta=r.mrope_position_deltas, extra_ids=r.prompt_table_extra_ids, **kw)

    return make


@pytest.fixture(scope="session")
def assert_prefill_matches(spec, preprocessor, encoder, oracle):
    """Check a LanguageModel's prefill logits against transformers' (max |diff| <= tol), with
    images of two sizes and text only, through the package's preprocessing and vision encoder."""
    import numpy as np
    import torch

    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.lm import StepSeq
    from qwen3vl_triton.model.vision import EncodeRequest
    from tests.oracle import image_bytes

    def check(lm, tol=1e-4):
        for prompt, images in [("Two pictures.", [image_bytes(120, 80, 8), image_bytes(64, 200, 9)]), ("Text.", [])]:
            p = preprocessor(prompt, images)
            r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
            cos, sin = mrope.unpack_cos_sin(r.mrope_rotary_cos_sin, spec, p.input_ids.size)
            ours = lm.forward([StepSeq(0, torch.from_numpy(p.input_ids.astype(np.int64)), 0, cos, sin,
                                       r.prompt_embedding_table, all_logits=True)])[0]
            ref = oracle.prefill_logits(prompt, images)
            assert ours.shape == ref.shape
            diff = (ours - ref).abs().max().item()
            assert diff <= tol, f"{prompt!r}: max |logit diff| {diff:.2e} > {tol:.0e}"

    return check


# -- servers -----------------------------------------------------------------------------------
SERVER_SETTINGS = dict(max_output_len=256, max_seq_len=2048, max_images=4, max_image_pixels=1_000_000,
                       engine_max_batch=8, max_batch_size=16)


def start_server(checkpoint, tmp_path_factory, topology, name, prepare=None, **overrides):
    from qwen3vl_triton.serve.cpu_engine import render_prepared
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import Ports, TritonServer, free_ports

    base = tmp_path_factory.mktemp(name)
    settings = Settings(**{**SERVER_SETTINGS, **overrides})
    # as the launcher: the engine's weights (ggml runner) converted before the server starts, once
    # per session for every server (the conversions live under the session's base folder)
    repo, _ = render_prepared(checkpoint, base / "repository", tmp_path_factory.getbasetemp() / "build",
                              settings, topology=topology, log=lambda *_: None)
    if prepare is not None:
        repo = prepare(repo)
    http, grpc, metrics = free_ports(3)
    # Triton 2.51's ensemble keeps one in-flight count for each stream a client cancels mid-way,
    # so a graceful stop would wait the full exit timeout (30 s by default) for nothing.
    server = TritonServer(repo, Ports(http, grpc, metrics), build_dir=base, log_file=base / "tritonserver.log",
                          extra_args=["--exit-timeout-secs=5"])
    server.start(timeout=300, log=lambda *_: None)
    return server


@pytest.fixture(scope="session")
def default_server(tiny_checkpoint, tmp_path_factory):
    """One real tritonserver with every model and the default settings (the CPU engine on
    cpu_runner=auto: the ggml runner for the all-MoE tiny checkpoint), for the whole session."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "all", "server")
    srv.runner = "ggml" if _has_llama_cpp() else "torch"
    yield srv
    srv.stop()


# Generations a client leaves must be long enough that the stop lands before their end even on a
# loaded host: greedy on the tiny checkpoint, LONG_PROMPT runs past LONG_TOKENS tokens (at ~2 ms
# a token, seconds), where the session server's 256 would end in half a second.
LONG_PROMPT = "Go on forever."
LONG_TOKENS = 1500


@pytest.fixture(scope="session")
def long_server(tiny_checkpoint, tmp_path_factory):
    """A server whose max_output_len admits LONG_TOKENS, for the tests of generations left early."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "single", "long-server", max_output_len=LONG_TOKENS + 36)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server(default_server):
    """The session's server (a module whose tests run on both CPU runners overrides it with
    `each_runner_server`)."""
    return default_server


@pytest.fixture(scope="session")
def torch_server(tiny_checkpoint, tmp_path_factory):
    """The single-server repository served by the torch runner (cpu_runner=torch, the reference)."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "single", "torch-server", cpu_runner="torch")
    srv.runner = "torch"
    yield srv
    srv.stop()


RUNNERS = ("ggml", "torch")  # the CPU engine's runners: llama.cpp's kernels, and the torch reference


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request):
    """Each CPU runner in turn, for a module's engine behaviour tests (parametrized, one body)."""
    if request.param == "ggml" and not _has_llama_cpp():
        pytest.skip("llama-cpp-python is not installed (`make venv` builds it)")
    return request.param


@pytest.fixture(scope="module")
def each_runner_server(runner, request):
    """The server whose `tensorrt_llm` runs on `runner`: the default server (ggml) or torch_server;
    `.runner` names it."""
    return request.getfixturevalue("default_server" if runner == "ggml" else "torch_server")


@pytest.fixture(scope="session")
def encoder_server(tiny_checkpoint, tmp_path_factory):
    """The disaggregated encoder server (`encode` = preprocessing -> vision_encoder)."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "encoder", "encoder")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def language_server(tiny_checkpoint, tmp_path_factory):
    """The disaggregated language server (`language` -> tensorrt_llm), in its own process. Its row
    cache is off: the tests that use it check the transfer, so every request sends every row (the
    row cache is tested in test_scale.py, on the cluster's servers)."""
    srv = start_server(tiny_checkpoint, tmp_path_factory, "language", "language", language_row_cache_bytes=0)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def engine_dir(spec, tmp_path_factory):
    """A TensorRT-LLM engine directory's config.json as Engine.save writes it (no engine file):
    enough to render and check the GPU repository without a GPU."""
    import json

    from qwen3vl_triton.trtllm.build import EngineSettings, build_config_fields
    from qwen3vl_triton.trtllm.convert import trtllm_config

    settings = EngineSettings(max_batch_size=4, max_image_tokens=96, max_input_len=512, max_seq_len=1024,
                              max_num_tokens=1024)
    pretrained = trtllm_config(spec, "bfloat16") | {"deepstack_impl": "plugin", "deepstack_stride": 96}
    path = tmp_path_factory.mktemp("engine")
    (path / "config.json").write_text(json.dumps({
        "version": "1.2.1", "pretrained_config": pretrained,
        "build_config": build_config_fields(settings, pretrained)}))
    return path
