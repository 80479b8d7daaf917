"""Rendering the model repository: strict templates, consistent settings, CPU and GPU variants."""

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from qwen3vl_triton.serve.repository import TEMPLATES, TOPOLOGIES, RenderError, Settings, render


def load(repo, model):
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def params(config):
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_every_topology_renders_configs_triton_can_parse(topology, tiny_checkpoint, tmp_path):
    repo = render(tiny_checkpoint, tmp_path / "repo", topology=topology)
    expected = {m for m in TOPOLOGIES[topology] if m != "qwen3vl_disagg"}  # that one needs language_url
    assert {p.name for p in repo.iterdir()} == expected
    for model in expected:
        config = load(repo, model)
        assert config.name == model
        assert "${" not in (repo / model / "config.pbtxt").read_text()
        assert (repo / model / "1").is_dir()  # Triton serves only versioned models
        if config.backend == "python":
            assert (repo / model / "1" / "model.py").is_file()
            # the stub finds the virtual environment, through the folder's link to it
            assert params(config)["EXECUTION_ENV_PATH"] == "$$TRITON_MODEL_DIRECTORY/python_env"
            assert (repo / model / "python_env" / "bin" / "activate").is_file()
        if "checkpoint" in params(config):
            assert params(config)["checkpoint"] == "checkpoint"
            assert (repo / model / "checkpoint").resolve() == tiny_checkpoint.resolve()


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_no_rendered_configuration_names_a_host_path(device, tiny_checkpoint, tmp_path, engine_dir):
    repo = render(tiny_checkpoint, tmp_path / "repo", device=device, topology="all",
                  engine_dir=engine_dir if device == "gpu" else None,
                  settings=Settings(max_seq_len=1024, max_output_len=256, language_url="h:1"))
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        for needle in (str(tmp_path), str(tiny_checkpoint.resolve()), str(engine_dir.resolve()), "/work", "/root"):
            assert needle not in text, f"{config}: names {needle}"
        for value in params(load(repo, config.parent.name)).values():
            assert not value.startswith("/"), f"{config}: {value}"


def test_a_tensor_declared_twice_fails_at_render_time(tiny_checkpoint, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    path = templates / "tensorrt_llm" / "config.pbtxt"
    text = path.read_text()
    path.write_text(text.replace("input [\n", 'input [\n  { name: "stop" data_type: TYPE_BOOL dims: [ 1 ] '
                                               'optional: true },\n', 1))
    with pytest.raises(RenderError, match=r"input\(s\) stop declared more than once"):
        render(tiny_checkpoint, tmp_path / "repo", templates=templates)


def test_settings_and_checkpoint_facts_reach_the_configs(tiny_checkpoint, tmp_path, spec):
    repo = render(tiny_checkpoint, tmp_path / "repo", settings=Settings(max_output_len=100, max_images=3,
                                                                          language_url="10.0.0.1:8001",
                                                                          pixel_cache_bytes=12345))
    assert params(load(repo, "preprocessing"))["max_images"] == "3"
    assert params(load(repo, "preprocessing"))["pixel_cache_bytes"] == "12345"
    assert params(load(repo, "tensorrt_llm"))["max_output_len"] == "100"
    table = [o for o in load(repo, "vision_encoder").output if o.name == "prompt_embedding_table"][0]
    assert list(table.dims) == [-1, spec.hidden_size]
    assert not (repo / "qwen3vl_disagg").exists()  # not in the `all` topology
    enc = render(tiny_checkpoint, tmp_path / "enc", topology="encoder", settings=Settings(language_url="h:1"))
    assert params(load(enc, "qwen3vl_disagg"))["language_urls"] == "h:1"  # a one-server list
    pool = render(tiny_checkpoint, tmp_path / "pool", topology="encoder",
                  settings=Settings(language_urls="a:1,b:2", migration_limit=5))
    assert params(load(pool, "qwen3vl_disagg"))["language_urls"] == "a:1,b:2"
    assert params(load(pool, "qwen3vl_disagg"))["migration_limit"] == "5"


@pytest.mark.parametrize("settings, message", [
    (dict(language_urls="a:1", language_url="b:2"), "set language_urls or language_url, not both"),
    (dict(language_urls="a:1,nohost"), "language_urls: 'nohost' is not HOST:PORT"),
    (dict(language_urls="a:1,a:1"), "language_urls: a server is listed twice"),
    (dict(language_urls="dns:svc"), "language_urls: expected dns:NAME:PORT"),
    (dict(language_url="a:1,b:2"), "language_url: one HOST:PORT"),
    (dict(migration_limit=-1), "migration_limit must be >= 0"),
])
def test_language_server_settings_are_checked_by_name(tiny_checkpoint, tmp_path, settings, message):
    with pytest.raises(RenderError, match=message):
        render(tiny_checkpoint, tmp_path / "bad", topology="encoder", settings=Settings(**settings))


def test_an_unfilled_placeholder_fails_at_render_time(tiny_checkpoint, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    cfg = templates / "postprocessing" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + '\nparameters { key: "x" value: { string_value: "${no_such_value}" } }\n')
    with pytest.raises(RenderError, match=r"postprocessing/config.pbtxt: no value for placeholder\(s\) no_such_value"):
        render(tiny_checkpoint, tmp_path / "repo", templates=templates)


def test_a_config_triton_cannot_parse_fails_at_render_time(tiny_checkpoint, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    cfg = templates / "preprocessing" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size:", "max_batch_sise:"))
    with pytest.raises(RenderError, match="preprocessing/config.pbtxt: not a valid Triton model config"):
        render(tiny_checkpoint, tmp_path / "repo", templates=templates)


@pytest.mark.parametrize("settings, message", [
    (Settings(max_output_len=4096, max_seq_len=4096), "leaves no room for a prompt"),
    (Settings(max_seq_len=100_000), "exceeds the model's max_position_embeddings"),
    (Settings(dtype="float16"), "the CPU engine serves float32 or bfloat16"),
    (Settings(max_batch_size=0), "max_batch_size must be >= 1"),
    (Settings(dtype="float64"), "dtype 'float64'"),
    (Settings(openai_body_budget_bytes=2**20), "openai_body_budget_bytes 1048576 is below max_request_bytes"),
    (Settings(openai_header_timeout_ms=0), "openai_header_timeout_ms must be >= 1"),
])
def test_inconsistent_settings_are_refused(settings, message, tiny_checkpoint, tmp_path):
    with pytest.raises(RenderError, match=message):
        render(tiny_checkpoint, tmp_path / "repo", settings=settings)


def test_gpu_repository_takes_the_engine_facts(tiny_checkpoint, tmp_path, engine_dir):
    from qwen3vl_triton.trtllm.build import EngineFacts

    facts = EngineFacts.load(engine_dir)
    repo = render(tiny_checkpoint, tmp_path / "repo", device="gpu", engine_dir=engine_dir, topology="single",
                  settings=Settings(max_seq_len=1024, max_output_len=256, cancellation_check_period_ms=50))
    llm = load(repo, "tensorrt_llm")
    # the engine by a link in the rendered folder, relative to the repository (tritonserver runs there)
    assert llm.backend == "tensorrtllm" and params(llm)["gpt_model_path"] == "tensorrt_llm/engine"
    assert (repo / "tensorrt_llm" / "engine").resolve() == engine_dir.resolve()
    assert (params(llm)["cancellation_check_period_ms"], params(llm)["stats_check_period_ms"]) == ("50", "100")
    for model in ("qwen3vl", "preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing"):
        assert load(repo, model).max_batch_size == facts.max_batch_size
    vision = load(repo, "vision_encoder")
    p = params(vision)
    assert (p["device"], p["table_stride"], p["mrope_positions"]) == ("cuda", str(facts.table_stride),
                                                                       str(facts.mrope_positions))
    assert vision.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    table = [o for o in vision.output if o.name == "prompt_embedding_table"][0]
    assert mc.DataType.Name(table.data_type) == "TYPE_BF16"
    # postprocessing runs its request on tensorrt_llm: every input it sends exists on the engine
    from qwen3vl_triton.contract import LLM_INPUT_NAMES

    assert LLM_INPUT_NAMES["seed"] == "seed"  # TensorRT-LLM 1.2's name
    llm_inputs = {i.name for i in llm.input}
    assert {*LLM_INPUT_NAMES.values(), "streaming", "stop"} <= llm_inputs
    post = {i.name for i in load(repo, "postprocessing").input}
    assert set(LLM_INPUT_NAMES) <= post


def test_gpu_repository_refuses_an_engine_of_another_checkpoint(tiny_checkpoint, tmp_path, engine_dir):
    other = tmp_path / "other"
    shutil.copytree(engine_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["pretrained_config"]["hidden_size"] += 8
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RenderError, match="was not built from this checkpoint: hidden_size"):
        render(tiny_checkpoint, tmp_path / "repo", device="gpu", engine_dir=other,
               settings=Settings(max_seq_len=1024, max_output_len=256))
    with pytest.raises(RenderError, match="needs engine_dir"):
        render(tiny_checkpoint, tmp_path / "repo", device="gpu")
    # a bfloat16 engine serves the disaggregated `language` model too: it holds bf16 tables
    repo = render(tiny_checkpoint, tmp_path / "repo", device="gpu", engine_dir=engine_dir, topology="all",
                  settings=Settings(max_seq_len=1024, max_output_len=256))
    assert 'name: "chunk" data_type: TYPE_BF16' in (repo / "language" / "config.pbtxt").read_text()


def test_the_render_builder_is_the_same_renderer(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    ok = subprocess.run([sys.executable, str(ROOT / "builders" / "render_repository.py"), "--checkpoint",
                         str(tiny_checkpoint), "--out", str(tmp_path / "r"), "--topology", "language"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "language", "postprocessing", "tensorrt_llm"]
    bad = subprocess.run([sys.executable, str(ROOT / "builders" / "render_repository.py"), "--checkpoint",
                          str(tiny_checkpoint), "--out", str(tmp_path / "g"), "--device", "gpu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: device gpu needs engine_dir")
