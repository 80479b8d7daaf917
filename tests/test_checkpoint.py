"""The tiny checkpoint: deterministic, complete, in the hub's format, read through ModelSpec."""

import json

import torch

from qwen3vl_triton.checkpoint import ModelSpec, iter_tensors
from qwen3vl_triton.tiny import build_checkpoint, checkpoint_digest


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path, tiny_checkpoint):
    again = build_checkpoint(tmp_path / "again", seed=0, log=lambda *_: None)
    other = build_checkpoint(tmp_path / "other", seed=1, log=lambda *_: None)
    assert checkpoint_digest(again) == checkpoint_digest(tiny_checkpoint)
    assert checkpoint_digest(other) != checkpoint_digest(tiny_checkpoint)


def test_spec_reads_ids_and_sizes_from_the_files(spec, oracle):
    tok, cfg = oracle.tokenizer, oracle.config
    assert spec.end_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert spec.image_token_id == cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert spec.vocab_size == cfg.text_config.vocab_size >= len(tok)
    assert spec.hidden_size == cfg.text_config.hidden_size == cfg.vision_config.out_hidden_size
    assert spec.deepstack_levels == len(cfg.vision_config.deepstack_visual_indexes) == 3
    assert max(cfg.vision_config.deepstack_visual_indexes) < cfg.vision_config.depth
    assert spec.num_layers >= 3 and spec.num_experts > spec.experts_per_token > 0
    assert spec.mrope_section == tuple(cfg.text_config.rope_parameters["mrope_section"])
    pre = json.loads((spec.path / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == spec.patch_size == 16 and pre["image_mean"] == [0.5, 0.5, 0.5]
    assert (spec.min_pixels, spec.max_pixels) == (pre["size"]["shortest_edge"], pre["size"]["longest_edge"])


def test_experts_are_stored_in_the_hub_layout_and_transformers_reads_them(spec, oracle):
    state = dict(iter_tensors(spec.path, "model.language_model.layers.0.mlp.experts."))
    h, inter = spec.hidden_size, spec.moe_intermediate_size
    assert state["gate_up_proj"].shape == (spec.num_experts, h, 2 * inter)  # [E, in, out]
    loaded = oracle.model.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(loaded, state["gate_up_proj"].transpose(1, 2))


def test_every_tensor_is_used_by_transformers(spec, oracle):
    names = {name for name, _ in iter_tensors(spec.path)}
    assert names == set(oracle.model.state_dict())


def test_spec_refuses_a_non_qwen3_vl_moe_checkpoint(tmp_path, tiny_checkpoint):
    import shutil
    import pytest
    from qwen3vl_triton.checkpoint import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        ModelSpec.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelSpec.load(tmp_path / "nowhere")
