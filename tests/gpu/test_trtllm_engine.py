"""The TensorRT-LLM engine on a GPU: the tiny checkpoint converted and built twice (DeepstackAdd
plugin, stock ops), served through TensorRT-LLM's executor -- the runtime the tensorrtllm backend
uses -- and compared with transformers (the oracle) and with each other.

Needs an NVIDIA GPU, TensorRT-LLM 1.2 and TensorRT's headers and library for the plugin build
(the tritonserver:<yy.mm>-trtllm-python-py3 image has them). Skipped elsewhere, with the reason.
"""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.table import pack_table, stride_of
from qwen3vl_triton.model.vision import EncodeRequest
from tests.oracle import image_bytes

ROOT = Path(__file__).resolve().parents[2]
STRIDE = 256  # engine table stride S: enough for every case below
CASES = [
    ("one image", "Describe this image in short.", [image_bytes(100, 150, 1)]),
    ("two images of different sizes", "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3)]),
    ("text only", "Tell me about the ocean.", []),
]


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed"
    if shutil.which("cmake") is None:
        return "cmake is needed to build the DeepstackAdd plugin"
    return None


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("plugin")
    arch = "{0}{1}".format(*torch.cuda.get_device_capability())
    for cmd in (["cmake", "-S", ROOT / "builders" / "plugin", "-B", build, f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                 f"-DTENSORRT_ROOT={os.environ.get('TENSORRT_ROOT', '/usr/local/tensorrt')}"],
                ["cmake", "--build", build, "-j"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return build / "libqwen3vl_deepstack_plugin.so"


@pytest.fixture(scope="module")
def engines(plugin_library, tiny_checkpoint, tmp_path_factory):
    from qwen3vl_triton.trtllm.build import EngineSettings, build_engine
    from qwen3vl_triton.trtllm.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("engines")
    ckpt = convert_checkpoint(tiny_checkpoint, root / "ckpt", "float32")
    built = {}
    for impl in ("plugin", "stock"):
        settings = EngineSettings(max_batch_size=4, max_image_tokens=STRIDE, max_input_len=1024, max_seq_len=2048,
                                  max_num_tokens=4096, deepstack_impl=impl, gather_context_logits=True)
        built[impl] = build_engine(ckpt, root / impl, settings, plugin_library)
    return built


def _request(spec, preprocessor, encoder, facts, prompt, images, max_tokens):
    """An executor request exactly as the tensorrtllm backend builds one from the contract inputs."""
    import tensorrt_llm.bindings.executor as trtllm

    p = preprocessor(prompt, images)
    r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
    table, s = r.prompt_embedding_table, stride_of(r.prompt_vocab_size, spec.deepstack_levels)
    n = int((p.input_ids >= spec.vocab_size).sum())
    levels = [table[(k + 1) * s:(k + 1) * s + n] for k in range(spec.deepstack_levels)]
    table = pack_table(table[:n], levels, stride=facts.table_stride)  # the engine's stride
    pos, delta = mrope.position_ids(p.input_ids, p.image_grid_thw, spec)
    cos_sin = mrope.rotary_cos_sin(pos, spec, facts.mrope_positions)
    return trtllm.Request(
        input_token_ids=p.input_ids.tolist(), max_tokens=max_tokens, streaming=False,
        sampling_config=trtllm.SamplingConfig(beam_width=1, top_k=1),
        output_config=trtllm.OutputConfig(return_context_logits=True, exclude_input_from_output=True),
        end_id=spec.end_id, pad_id=spec.pad_id,
        prompt_tuning_config=trtllm.PromptTuningConfig(embedding_table=table.to(torch.float32)),
        mrope_config=trtllm.MropeConfig(mrope_rotary_cos_sin=torch.from_numpy(cos_sin),
                                        mrope_position_deltas=torch.tensor([delta], dtype=torch.int32)))


def _run(engine_dir, requests):
    """Enqueue all requests at once (one in-flight batch), return {index: (tokens, context logits)}."""
    import tensorrt_llm.bindings.executor as trtllm

    config = trtllm.ExecutorConfig(1, kv_cache_config=trtllm.KvCacheConfig(free_gpu_memory_fraction=0.2,
                                                                           enable_block_reuse=False))
    executor = trtllm.Executor(Path(engine_dir), trtllm.ModelType.DECODER_ONLY, config)
    try:
        ids = {executor.enqueue_request(r): i for i, r in enumerate(requests)}
        results = {}
        while len(results) < len(ids):
            for response in executor.await_responses():
                assert not response.has_error(), response.error_msg
                if response.result.is_final:
                    results[ids[response.request_id]] = (list(response.result.output_token_ids[0]),
                                                         torch.as_tensor(response.result.context_logits).float())
        return results
    finally:
        executor.shutdown()


@pytest.mark.parametrize("impl", ["plugin", "stock"])
def test_batched_engine_greedy_and_prefill_logits_equal_transformers(
    impl, engines, spec, preprocessor, encoder, oracle
):
    from qwen3vl_triton.trtllm.build import EngineFacts

    facts = EngineFacts.load(engines[impl])
    assert facts.deepstack_impl == impl and facts.table_stride == STRIDE
    requests = [_request(spec, preprocessor, encoder, facts, prompt, images, 16) for _, prompt, images in CASES]
    results = _run(engines[impl], requests)
    for i, (name, prompt, images) in enumerate(CASES):
        tokens, logits = results[i]
        ref = oracle.prefill_logits(prompt, images)
        assert logits.shape == ref.shape, name
        assert (logits.cpu() - ref).abs().max().item() <= 1e-2, name
        assert tokens == oracle.generate(prompt, images, 16), name


def test_plugin_and_stock_engines_agree(engines, spec, preprocessor, encoder):
    from qwen3vl_triton.trtllm.build import EngineFacts

    outputs = {}
    for impl, engine in engines.items():
        facts = EngineFacts.load(engine)
        outputs[impl] = _run(engine, [_request(spec, preprocessor, encoder, facts, p, im, 8) for _, p, im in CASES])
    for i in range(len(CASES)):
        assert outputs["plugin"][i][0] == outputs["stock"][i][0]
        torch.testing.assert_close(outputs["plugin"][i][1], outputs["stock"][i][1], rtol=0, atol=1e-5)
