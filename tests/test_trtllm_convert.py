"""Hugging Face -> TensorRT-LLM checkpoint conversion: layout, config, exact round trip, and the
CPU engine fed from the converted checkpoint against transformers."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import iter_tensors
from qwen3vl_triton.model.lm import LanguageModel, StepSeq
from qwen3vl_triton.trtllm.convert import convert_checkpoint, hf_tensors, load_hf_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted once per dtype."""
    root = tmp_path_factory.mktemp("trtllm")
    return {dtype: convert_checkpoint(tiny_checkpoint, root / dtype, dtype, log=lambda *_: None) for dtype in DTYPES}


def _read(path):
    with safe_open(str(path / "rank0.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_names_shapes_and_dtypes_are_tensorrt_llm_qwen_layout(converted, spec):
    tensors = _read(converted["bfloat16"])
    h, d, e, inter = spec.hidden_size, spec.head_dim, spec.num_experts, spec.moe_intermediate_size
    expected = {
        "transformer.vocab_embedding.weight": (spec.vocab_size, h),
        "transformer.ln_f.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    for i in range(spec.num_layers):
        p = f"transformer.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (h,),
            p + "post_layernorm.weight": (h,),
            p + "attention.qkv.weight": ((spec.num_heads + 2 * spec.num_kv_heads) * d, h),
            p + "attention.dense.weight": (h, spec.num_heads * d),
            p + "attention.q_layernorm.weight": (d,),
            p + "attention.k_layernorm.weight": (d,),
        })
        if spec.is_moe_layer(i):
            expected.update({p + "mlp.router.weight": (e, h), p + "mlp.fc.weight": (e, 2 * inter, h),
                             p + "mlp.proj.weight": (e, h, inter)})
        else:
            expected.update({p + "mlp.fc.weight": (spec.intermediate_size, h),
                             p + "mlp.gate.weight": (spec.intermediate_size, h),
                             p + "mlp.proj.weight": (h, spec.intermediate_size)})
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    for name, t in tensors.items():
        assert t.dtype == (torch.float32 if name.endswith("mlp.router.weight") else torch.bfloat16), name


def test_a_dense_layer_among_moe_layers_converts_to_a_gated_mlp(tmp_path):
    # The tiny profile is all-MoE (the published layout); a checkpoint with a dense layer
    # (mlp_only_layers, as fine-tuned variants have) covers the other MLP layout.
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.tiny import build_saved_checkpoint

    path = build_saved_checkpoint(tmp_path / "dense", mlp_only_layers=[1], log=lambda *_: None)
    spec = ModelSpec.load(path)
    out = convert_checkpoint(path, tmp_path / "trtllm", "float32", log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [1]
    tensors, h, inter = _read(out), spec.hidden_size, spec.intermediate_size
    assert {n: tuple(t.shape) for n, t in tensors.items() if n.startswith("transformer.layers.1.mlp.")} == {
        "transformer.layers.1.mlp.fc.weight": (inter, h), "transformer.layers.1.mlp.gate.weight": (inter, h),
        "transformer.layers.1.mlp.proj.weight": (h, inter)}
    source = dict(iter_tensors(path, "model.language_model.layers.1.mlp."))
    back = load_hf_tensors(out)
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = f"model.language_model.layers.1.mlp.{name}.weight"
        assert torch.equal(back[full], source[f"{name}.weight"]), full


def test_expert_layout_up_then_gate_and_down_transposed(converted, tiny_checkpoint, spec):
    layer = next(i for i in range(spec.num_layers) if spec.is_moe_layer(i))
    src = dict(iter_tensors(tiny_checkpoint, f"model.language_model.layers.{layer}.mlp.experts."))
    gate_up, down = src["gate_up_proj"], src["down_proj"]  # hub layout [E, H, 2I], [E, I, H]
    fc = _read(converted["float32"])[f"transformer.layers.{layer}.mlp.fc.weight"]
    proj = _read(converted["float32"])[f"transformer.layers.{layer}.mlp.proj.weight"]
    inter = spec.moe_intermediate_size
    expert = 3
    gate, up = gate_up[expert].T[:inter], gate_up[expert].T[inter:]  # transformers: gate, up = chunk(2)
    # MixtureOfExperts' fc rows: the linear half first, the half the activation is applied to second
    torch.testing.assert_close(fc[expert], torch.cat([up, gate]), rtol=0, atol=0)
    torch.testing.assert_close(proj[expert], down[expert].T, rtol=0, atol=0)


def test_config_is_a_qwen3_moe_qwen_config_with_mrope(converted, spec):
    cfg = json.loads((converted["float16"] / "config.json").read_text())
    assert cfg["architecture"] == "QWenForCausalLM" and cfg["qwen_type"] == "qwen3_moe"
    assert cfg["dtype"] == "float16" and cfg["logits_dtype"] == "float32"
    assert cfg["position_embedding_type"] == "mrope" and cfg["rotary_scaling"]["type"] == "mrope"
    assert cfg["rotary_embedding_dim"] == spec.head_dim and cfg["rotary_base"] == spec.rope_theta
    assert cfg["max_position_embeddings"] == spec.max_position_embeddings
    assert cfg["moe"] == {"num_experts": spec.num_experts, "top_k": spec.experts_per_token, "normalization_mode": 1}
    assert cfg["mlp_only_layers"] == list(spec.mlp_only_layers)
    assert cfg["hidden_act"] == "swiglu" and cfg["attn_bias"] is False
    assert cfg["norm_epsilon"] == spec.rms_norm_eps and cfg["head_size"] == spec.head_dim
    assert cfg["deepstack_levels"] == spec.deepstack_levels == 3
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}


def test_max_position_embeddings_override(tiny_checkpoint, tmp_path):
    out = convert_checkpoint(tiny_checkpoint, tmp_path / "short", "float32", max_position_embeddings=1024,
                             log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 1024


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_inverse_mapping_returns_every_language_model_tensor_exactly(converted, tiny_checkpoint, dtype):
    source = {n: t for n, t in iter_tensors(tiny_checkpoint) if n.startswith("model.language_model.")
              or n == "lm_head.weight"}
    back = load_hf_tensors(converted[dtype])
    assert back.keys() == source.keys()
    for name, t in source.items():
        want = t.to(torch.float32 if name.endswith("mlp.gate.weight") else DTYPES[dtype])
        assert back[name].shape == t.shape, name
        assert back[name].dtype == want.dtype, name
        assert torch.equal(back[name], want), name


def test_progress_is_reported_per_layer(tiny_checkpoint, tmp_path, spec):
    lines = []
    convert_checkpoint(tiny_checkpoint, tmp_path / "out", "bfloat16", log=lines.append)
    assert [line.split(" (")[0] for line in lines if line.startswith("[convert] layer ")] == [
        f"[convert] layer {i + 1}/{spec.num_layers}" for i in range(spec.num_layers)]
    assert not (tmp_path / "out" / "rank0.safetensors.partial").exists()


def test_cpu_engine_from_the_converted_checkpoint_matches_transformers(converted, spec, assert_prefill_matches):
    assert_prefill_matches(LanguageModel(spec, slots=1, max_len=512, tensors=load_hf_tensors(converted["float32"])))


def test_hf_tensors_is_the_inverse_of_the_layout(converted):
    config = json.loads((converted["float32"] / "config.json").read_text())
    tensors = _read(converted["float32"])
    back = hf_tensors(tensors, config)
    q = back["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (config["num_attention_heads"] * config["head_size"], config["hidden_size"])
    assert back["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape[1] == config["hidden_size"]


def test_the_logits_check_catches_a_swapped_expert_layout(converted, spec, preprocessor, oracle):
    """Negative control: the same comparison fails if gate and up were swapped by the conversion."""
    tensors = load_hf_tensors(converted["float32"])
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=-1)
            tensors[name] = torch.cat([up, gate], dim=-1)
    lm = LanguageModel(spec, slots=1, max_len=512, tensors=tensors)
    p = preprocessor("Text only.", [])
    cos, sin = mrope.text_cos_sin(torch.arange(p.input_ids.size), spec)
    ours = lm.forward([StepSeq(0, torch.from_numpy(p.input_ids.astype(np.int64)), 0, cos, sin, all_logits=True)])[0]
    assert (ours - oracle.prefill_logits("Text only.", [])).abs().max().item() > 1e-2
