"""The GPU `tensorrt_llm` model config and the engine build settings, checked without a GPU:
the template renders strictly and parses as a Triton ModelConfig with the tensorrtllm backend's
tensor names/types/dims, the build sizes the prompt table for 4S rows per request, and the
package's GPU modules import without TensorRT-LLM."""

import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.trtllm.build import EngineFacts, EngineSettings, build_config_fields
from qwen3vl_triton.trtllm.convert import trtllm_config

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "model_repository" / "tensorrt_llm" / "config.gpu.pbtxt"

# TensorRT-LLM 1.2 triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt:
# (name, data_type, dims, reshape, optional, allow_ragged_batch); table type and width are ours.
UPSTREAM_INPUTS = [
    ("input_ids", "TYPE_INT32", [-1], None, True, True),
    ("input_lengths", "TYPE_INT32", [1], [], False, False),
    ("request_output_len", "TYPE_INT32", [1], [], False, False),
    ("end_id", "TYPE_INT32", [1], [], True, False),
    ("pad_id", "TYPE_INT32", [1], [], True, False),
    ("stop_words_list", "TYPE_INT32", [2, -1], None, True, True),
    ("bad_words_list", "TYPE_INT32", [2, -1], None, True, True),
    ("temperature", "TYPE_FP32", [1], [], True, False),
    ("runtime_top_k", "TYPE_INT32", [1], [], True, False),
    ("runtime_top_p", "TYPE_FP32", [1], [], True, False),
    ("repetition_penalty", "TYPE_FP32", [1], [], True, False),
    ("min_tokens", "TYPE_INT32", [1], [], True, False),
    ("presence_penalty", "TYPE_FP32", [1], [], True, False),
    ("frequency_penalty", "TYPE_FP32", [1], [], True, False),
    ("seed", "TYPE_UINT64", [1], [], True, False),
    ("return_log_probs", "TYPE_BOOL", [1], [], True, False),
    ("return_context_logits", "TYPE_BOOL", [1], [], True, False),
    ("return_generation_logits", "TYPE_BOOL", [1], [], True, False),
    ("exclude_input_in_output", "TYPE_BOOL", [1], [], True, False),
    ("stop", "TYPE_BOOL", [1], [], True, False),
    ("streaming", "TYPE_BOOL", [1], [], True, False),
    ("prompt_embedding_table", "TYPE_BF16", [-1, 64], None, True, True),
    ("prompt_vocab_size", "TYPE_INT32", [1], [], True, False),
    ("mrope_rotary_cos_sin", "TYPE_FP32", [-1], None, True, False),
    ("mrope_position_deltas", "TYPE_INT64", [1], None, True, False),
    ("prompt_table_extra_ids", "TYPE_UINT64", [-1], None, True, True),
]
UPSTREAM_OUTPUTS = [
    ("output_ids", "TYPE_INT32", [-1, -1]),
    ("sequence_length", "TYPE_INT32", [-1]),
    ("cum_log_probs", "TYPE_FP32", [-1]),
    ("output_log_probs", "TYPE_FP32", [-1, -1]),
    ("context_logits", "TYPE_FP32", [-1, -1]),
    ("generation_logits", "TYPE_FP32", [-1, -1, -1]),
    ("batch_index", "TYPE_INT32", [1]),
    ("sequence_index", "TYPE_INT32", [1]),
]


def _values(engine_dir) -> dict:
    serving = Settings()
    return EngineFacts.load(engine_dir).config_values(
        engine_dir, cancellation_check_period_ms=serving.cancellation_check_period_ms,
        stats_check_period_ms=serving.stats_check_period_ms, max_queue_size=serving.max_queue_size)


def _render(values: dict) -> str:
    template = string.Template(TEMPLATE.read_text())
    return template.substitute(values)  # KeyError on any placeholder left unfilled


def test_template_placeholders_are_exactly_the_engine_facts(engine_dir):
    values = _values(engine_dir)
    placeholders = {m.group(1) for m in re.finditer(r"\$\{(\w+)\}", TEMPLATE.read_text())}
    assert placeholders == set(values)


def test_rendered_config_is_a_decoupled_inflight_tensorrtllm_model(engine_dir):
    config = text_format.Parse(_render(_values(engine_dir)), mc.ModelConfig())
    assert config.name == "tensorrt_llm" and config.backend == "tensorrtllm"
    assert config.max_batch_size == 4
    assert config.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(engine_dir)
    # fake ids repeat across images: reuse is on (a bf16 engine, paged context FMHA) with the images' ids declared
    assert params["enable_kv_cache_reuse"] == "true"
    assert any(i.name == "prompt_table_extra_ids" and i.data_type == mc.TYPE_UINT64 for i in config.input)
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.9"
    # read by the backend without a default: must exist
    assert {"tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"} <= params.keys()


def test_rendered_inputs_and_outputs_are_the_tensorrtllm_backends(engine_dir):
    config = text_format.Parse(_render(_values(engine_dir)), mc.ModelConfig())
    inputs = [(i.name, mc.DataType.Name(i.data_type), list(i.dims),
               list(i.reshape.shape) if i.HasField("reshape") else None, i.optional, i.allow_ragged_batch)
              for i in config.input]
    assert inputs == UPSTREAM_INPUTS
    outputs = [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output]
    assert outputs == UPSTREAM_OUTPUTS
    contract = {"input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "streaming", "temperature",
                "runtime_top_k", "runtime_top_p", "prompt_embedding_table", "prompt_vocab_size",
                "mrope_rotary_cos_sin", "mrope_position_deltas"}
    assert contract <= {i[0] for i in inputs}  # docs/design.md §3 (the seed is `seed` in the backend)


def test_engine_facts_give_the_stride_every_table_must_use(engine_dir, spec):
    facts = EngineFacts.load(engine_dir)
    assert facts.table_stride == 96
    assert facts.prompt_vocab_size == (spec.deepstack_levels + 1) * 96
    assert facts.mrope_positions == spec.max_position_embeddings
    assert facts.hidden_size == spec.hidden_size and facts.dtype == "bfloat16"
    assert _values(engine_dir)["table_dtype"] == "TYPE_BF16"


def test_build_sizes_the_prompt_table_for_four_blocks_per_request(spec):
    cfg = trtllm_config(spec, "float32")
    fields = build_config_fields(EngineSettings(max_batch_size=8, max_image_tokens=100, max_seq_len=4096), cfg)
    # TensorRT-LLM's prompt_vocab_size = max_prompt_embedding_table_size / max_batch_size = 4S
    assert fields["max_prompt_embedding_table_size"] // fields["max_batch_size"] == 4 * 100
    assert fields["use_mrope"] is True
    assert fields["plugin_config"]["remove_input_padding"] and fields["plugin_config"]["paged_kv_cache"]
    assert fields["plugin_config"]["context_fmha"] is False  # no fp32 fused MHA
    assert fields["plugin_config"]["use_paged_context_fmha"] is False  # so no KV cache reuse in fp32
    fp16 = build_config_fields(EngineSettings(max_seq_len=4096), trtllm_config(spec, "float16"))
    assert fp16["plugin_config"]["context_fmha"]


@pytest.mark.parametrize("settings, message", [
    (EngineSettings(deepstack_impl="fused"), "deepstack_impl must be one of"),
    (EngineSettings(max_image_tokens=5000, max_input_len=4096), "exceeds max_input_len"),
    (EngineSettings(max_seq_len=10**6, max_input_len=4096), "max_position_embeddings"),
])
def test_build_refuses_inconsistent_settings(spec, settings, message):
    with pytest.raises(ValueError, match=message):
        build_config_fields(settings, trtllm_config(spec, "bfloat16"))


def test_gpu_modules_import_without_tensorrt_llm():
    code = ("import sys; import qwen3vl_triton.trtllm.convert, qwen3vl_triton.trtllm.deepstack, "
            "qwen3vl_triton.trtllm.build; "
            "assert 'tensorrt_llm' not in sys.modules and 'tensorrt' not in sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["convert_checkpoint.py", "build_engine.py"])
def test_builder_scripts_start(script):
    proc = subprocess.run([sys.executable, str(ROOT / "builders" / "trtllm" / script), "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout, proc.stderr


def test_missing_plugin_library_says_how_to_build_it(tmp_path):
    from qwen3vl_triton.trtllm.build import load_plugin_library

    with pytest.raises(FileNotFoundError, match="cmake -S builders/plugin"):
        load_plugin_library(tmp_path / "libqwen3vl_deepstack_plugin.so")
