"""Which engine serves tensorrt_llm on a CPU (`cpu_runner`, `dtype`), its weights converted before the
server starts and reused, and the memory each dtype needs (`--check`)."""

import pytest

from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.memory import DTYPES, language_bytes, memory_facts
from qwen3vl_triton.serve import cpu_engine
from qwen3vl_triton.serve.repository import RenderError, Settings, render


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A layout llama.cpp's model does not cover: a dense layer among MoE layers."""
    from qwen3vl_triton.model.tiny import build_saved_checkpoint

    return build_saved_checkpoint(tmp_path_factory.mktemp("dense") / "ckpt", mlp_only_layers=[1], log=lambda *_: None)


def test_auto_serves_the_all_moe_checkpoint_on_ggml(spec):
    pytest.importorskip("llama_cpp")
    choice = cpu_engine.choose(spec, Settings())
    assert (choice.runner, choice.dtype, choice.float_dtype, choice.note) == ("ggml", "float32", "float32", None)
    q8 = cpu_engine.choose(spec, Settings(dtype="q8_0"))
    assert (q8.runner, q8.dtype, q8.float_dtype) == ("ggml", "q8_0", "float32")  # vision tower and tables fp32
    assert cpu_engine.choose(spec, Settings(cpu_runner="torch")).runner == "torch"


def test_auto_falls_back_to_torch_and_says_why(dense):
    spec = ModelSpec.load(dense)
    choice = cpu_engine.choose(spec, Settings())
    assert choice.runner == "torch"
    assert choice.note.startswith("cpu_runner=auto chose torch: llama.cpp's Qwen3-VL-MoE model makes every decoder "
                                  "layer MoE, and this checkpoint has dense layers [1]")
    logged = []
    assert cpu_engine.prepare(spec, Settings(), "cpu", "/nonexistent", log=logged.append).gguf is None
    assert logged == [f"[engine] {choice.note}"]


@pytest.mark.parametrize("settings, device, message", [
    (Settings(dtype="q8_0", cpu_runner="torch"), "cpu",
     "dtype q8_0: quantized weights are served by the ggml runner only (cpu_runner=ggml or auto); "
     "cpu_runner=torch serves float32 or bfloat16"),
    (Settings(dtype="q4_k"), "gpu", "dtype q4_k: quantized weights are the CPU engine's (ggml runner)"),
    (Settings(cpu_runner="fast"), "cpu", "cpu_runner must be one of auto, ggml, torch, got 'fast'"),
    (Settings(dtype="q5_k"), "cpu", "dtype 'q5_k' is not auto, float32, float16, bfloat16, q8_0 or q4_k"),
])
def test_a_runner_or_dtype_that_cannot_serve_is_refused_clearly(settings, device, message, spec):
    with pytest.raises(RenderError) as err:
        cpu_engine.choose(spec, settings, device)
    assert message in str(err.value)


def test_quantized_or_ggml_on_a_checkpoint_ggml_cannot_serve_is_refused(dense, tmp_path):
    spec = ModelSpec.load(dense)
    with pytest.raises(RenderError, match=r"dtype q8_0 needs the ggml runner, which cannot serve here: .*dense "
                                          r"layers \[1\]"):
        cpu_engine.choose(spec, Settings(dtype="q8_0"))
    with pytest.raises(RenderError, match=r"inconsistent settings: cpu_runner=ggml: .*dense layers \[1\]"):
        render(dense, tmp_path / "repo", topology="single", settings=Settings(cpu_runner="ggml"))


def test_the_weights_are_converted_once_and_reused(tiny_checkpoint, spec, tmp_path):
    pytest.importorskip("llama_cpp")
    logged = []
    first = cpu_engine.prepare(spec, Settings(), "cpu", tmp_path, log=logged.append)
    assert first.gguf.parent == tmp_path / "ggml" and first.gguf.is_file()
    assert any(line.startswith("[ggml] converting") for line in logged)  # progress on the console
    logged.clear()
    again = cpu_engine.prepare(spec, Settings(), "cpu", tmp_path, log=logged.append)
    assert again.gguf == first.gguf and logged == [f"[ggml] weights: {first.gguf} (converted before; the "
                                                   "checkpoint has not changed)"]
    repo, choice = cpu_engine.render_prepared(tiny_checkpoint, tmp_path / "repo", tmp_path, Settings(),
                                              topology="single", log=logged.append)
    config = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    # the configuration names the link in the model's folder, never the host path (model-config is open)
    assert 'key: "gguf" value: { string_value: "weights.gguf" }' in config and str(tmp_path) not in config
    assert (repo / "tensorrt_llm" / "weights.gguf").resolve() == first.gguf.resolve()
    assert 'key: "cpu_runner" value: { string_value: "ggml" }' in config


def test_quantized_dtypes_render_a_float32_vision_tower(tiny_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp")
    repo = render(tiny_checkpoint, tmp_path / "repo", topology="single", settings=Settings(dtype="q4_k"))
    llm = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "dtype" value: { string_value: "q4_k" }' in llm and "TYPE_FP32" in llm
    assert 'key: "dtype" value: { string_value: "float32" }' in (repo / "vision_encoder" / "config.pbtxt").read_text()


def test_memory_of_the_published_sizes_matches_the_published_gguf_files():
    # the 30B-A3B's language model as GGUF (the published Qwen3-VL-30B-A3B-Instruct-GGUF files,
    # text model only): Q8_0 32.5 GB, Q4_K_M 18.6 GB
    from qwen3vl_triton.model.known import published_spec

    spec = published_spec("Qwen/Qwen3-VL-30B-A3B-Instruct")
    assert language_bytes(spec, "q8_0") == pytest.approx(32.5e9, rel=0.01)
    assert language_bytes(spec, "q4_k") == pytest.approx(18.6e9, rel=0.01)
    assert language_bytes(spec, "float32") == pytest.approx(4 * 30.5e9, rel=0.01)
    lines = dict(memory_facts(spec, host_bytes=64 * 2**30, sequences=4, max_len=8192))
    assert lines["memory q4_k"].endswith(": fits (ggml runner)") and lines["memory float32"].endswith("does not fit")
    assert [k for k in lines if k.startswith("memory")] == [f"memory {d}" for d in DTYPES]


def test_memory_estimate_matches_the_converted_file(tiny_checkpoint, spec, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = cpu_engine.prepare(spec, Settings(), "cpu", tmp_path, log=lambda *_: None).gguf
    # the file also holds the tokenizer (vocabulary, merges) and metadata
    assert language_bytes(spec, "float32") <= gguf.stat().st_size <= language_bytes(spec, "float32") + 256 * 2**10


def test_engine_threads_leave_the_stubs_a_core_on_the_ggml_runner():
    # measured on 2 cores (docs/engine.md, "Threads"): ggml on 2 threads starved the stubs; torch keeps its own choice
    assert cpu_engine.engine_threads("ggml", 2) == (1, 1)
    assert cpu_engine.engine_threads("ggml", 16) == (15, 15)
    assert cpu_engine.engine_threads("ggml", 1) == (1, 1)
    assert cpu_engine.engine_threads("ggml", 16, prefill=4, decode=2) == (4, 2)  # the settings win
    assert cpu_engine.engine_threads("torch", 2) == (2, 1)
