"""Checkpoints as written by tiny.py (the hub's files) and by transformers' save_pretrained, read
through one reader; the pre-flight check on good, broken, quantized and unknown checkpoints and
on the published configurations; end ids as stop words; the dtype setting."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen3vl_triton.model.check import check_checkpoint, expected_tensors, parameter_counts, tensor_problems
from qwen3vl_triton.model.checkpoint import CheckpointError, ModelSpec, Tensors, experts_out_in, iter_tensors
from qwen3vl_triton.model.known import PUBLISHED
from qwen3vl_triton.model.tiny import build_checkpoint, build_saved_checkpoint, checkpoint_digest


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
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        ModelSpec.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelSpec.load(tmp_path / "nowhere")


# -- one reader: the layouts transformers writes -------------------------------------------------
EXPERTS = "model.language_model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model (same profile and seed as the hub one) written by save_pretrained, sharded."""
    return build_saved_checkpoint(tmp_path_factory.mktemp("saved") / "tiny", max_shard_size="300KB",
                                  log=lambda *_: None)


def test_a_save_pretrained_checkpoint_reads_as_the_hub_one(saved, spec):
    config = json.loads((saved / "config.json").read_text())["text_config"]
    assert config["num_local_experts"] == 8 and "num_experts" not in config  # the key the issue saw
    assert "rope_parameters" in config and "rope_theta" not in config
    ours = ModelSpec.load(saved)
    differ = {f for f in ModelSpec.__dataclass_fields__ if f not in ("path", "config")
              and getattr(ours, f) != getattr(spec, f)}
    assert not differ, {f: (getattr(ours, f), getattr(spec, f)) for f in differ}
    assert ours.moe_layers == (0, 1, 2, 3)  # not "every layer dense"


def test_the_same_weights_in_either_expert_layout_and_shards(saved, spec):
    hub, ours = Tensors(spec.path), Tensors(saved)
    assert (saved / "model.safetensors.index.json").is_file() and len({i.file for i in ours.info.values()}) > 1
    assert set(hub.names()) == set(ours.names())
    h, inter = spec.hidden_size, spec.moe_intermediate_size
    assert hub.info[EXPERTS].shape == (8, h, 2 * inter) and ours.info[EXPERTS].shape == (8, 2 * inter, h)
    for name in hub.names():
        a, b = hub.get(name), ours.get(name)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out, inp = (2 * inter, h) if "gate_up" in name else (h, inter)
            a, b = experts_out_in(a, out, inp, name), experts_out_in(b, out, inp, name)
        assert torch.equal(a, b), name


def test_experts_out_in_follows_transformers_rule():
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert experts_out_in(t, 3, 4, "x") is t
    assert torch.equal(experts_out_in(t, 4, 3, "x"), t.transpose(1, 2))
    square = torch.arange(18.0).reshape(2, 3, 3)
    assert experts_out_in(square, 3, 3, "x") is square  # as transformers: a shape that fits is taken as is
    with pytest.raises(CheckpointError, match=r"x has shape \[2, 3, 4\]; expected \[E, 5, 4\]"):
        experts_out_in(t, 5, 4, "x")


# -- the pre-flight check --------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, change):
    """Rewrite the single-file checkpoint's tensors through `change(dict)`."""
    tensors = {n: t for n, t in iter_tensors(path)}
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _serve(capsys, *args):
    """qwen3vl-serve with `args`, in this process: (exit status, stdout, stderr)."""
    from qwen3vl_triton.serve.launcher import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_passes_on_the_hub_and_saved_layouts_and_reports_the_facts(tiny_checkpoint, saved, capsys):
    for path in (tiny_checkpoint, saved):
        report = check_checkpoint(path)
        assert report.ok, report.text()
        facts = dict(report.facts)
        assert facts["MoE layers"].startswith("4 of 4: 0-3; dense: none")
        assert facts["experts"].startswith("8 per MoE layer, 2 per token")
        assert facts["DeepStack"].startswith("3 levels from vision blocks [1, 2, 3]")
        assert facts["end ids"] == "651 <|im_end|>, 649 <|endoftext|>"
        assert facts["dtype"] == "float32 (stored: F32 0.64M)"
    code, out, err = _serve(capsys, "--check", "--checkpoint", saved)
    assert code == 0, out + err
    assert "OK: every tensor the config implies is present with its shape" in out


def test_check_names_the_config_key_and_the_tensor_of_a_removed_tensor(tiny_checkpoint, tmp_path, capsys):
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    _rewrite(bad, lambda t: t.pop("model.visual.deepstack_merger_list.2.linear_fc2.weight"))
    report = check_checkpoint(bad)
    assert not report.ok
    assert report.problems == ["model.visual.deepstack_merger_list.2.linear_fc2.weight is missing "
                               "(vision_config.deepstack_visual_indexes=[1, 2, 3] (level 2, block 3); "
                               "vision_config.hidden_size=32 x vision_config.spatial_merge_size=2^2, "
                               "vision_config.out_hidden_size=64)"]
    code, out, _ = _serve(capsys, "--check", "--checkpoint", bad)
    assert code == 1 and "FAILED: 1 problem(s)" in out


def test_check_names_the_config_key_of_a_changed_shape(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    name = "model.language_model.layers.1.self_attn.k_proj.weight"
    _rewrite(bad, lambda t: t.__setitem__(name, t[name][:16]))
    assert check_checkpoint(bad).problems == [
        f"{name} has shape [16, 64], expected [32, 64] (text_config.num_key_value_heads=2 x text_config.head_dim=16 "
        "(text_config.num_hidden_layers=4))"]


def test_check_explains_a_config_that_disagrees_with_the_layers(tiny_checkpoint, tmp_path):
    """The failure the issue saw, from the other side: a config whose experts count is lost
    makes every layer dense, and the check says which key makes layer 0 dense."""
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["num_experts"] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = check_checkpoint(bad).problems
    assert ("model.language_model.layers.0.mlp.gate_proj.weight is missing (layer 0 is dense by "
            "text_config.num_experts=0, text_config.decoder_sparse_step=1, text_config.mlp_only_layers=[]; "
            "text_config.intermediate_size=128)") in problems
    assert any(p.startswith("model.language_model.layers.0.mlp.experts.down_proj is not part of the model this "
                            "config describes; layer 0 is dense") for p in problems)


def test_a_broken_checkpoint_is_refused_before_the_server_starts(tiny_checkpoint, tmp_path, capsys):
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    _rewrite(bad, lambda t: t.pop("lm_head.weight"))
    code, _, err = _serve(capsys, "--checkpoint", bad, "--build-dir", tmp_path / "build")
    assert code == 2
    assert "cannot be served: lm_head.weight is missing (text_config.vocab_size=768, tie_word_embeddings=False)" in err
    assert not (tmp_path / "build" / "repository").exists()


def test_quantized_checkpoints_are_refused_with_the_reason(tiny_checkpoint, tmp_path):
    fp8 = _copy(tiny_checkpoint, tmp_path / "fp8")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    _rewrite(fp8, lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    assert check_checkpoint(fp8).problems == [
        f"quantized weights: {name} is F8_E4M3 (1 tensor(s) not F32/F16/BF16); the engines serve unquantized "
        "float32/float16/bfloat16 weights"]
    config = _copy(tiny_checkpoint, tmp_path / "config")
    cfg = json.loads((config / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (config / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has a quantization_config \\(quant_method 'fp8'\\)"):
        ModelSpec.load(config)
    assert "quant_method 'fp8'" in check_checkpoint(config).problems[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="qwen2_vl_unknown"), "config.json cannot be read by transformers"),
        (dict(model_type="qwen2_vl"), "has model_type 'qwen2_vl'; this server runs 'qwen3_vl_moe'"),
        (
            dict(architectures=["Qwen3VLMoeForSomethingElse"]),
            "names architecture\\(s\\) \\['Qwen3VLMoeForSomethingElse'\\]",
        ),
    ],
)
def test_unknown_architectures_are_refused_with_the_reason(change, message, tiny_checkpoint, tmp_path, capsys):
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        ModelSpec.load(bad)
    code, out, _ = _serve(capsys, "--check", "--checkpoint", bad)
    assert code == 1 and "FAILED: 1 problem(s)" in out


def test_a_sharded_checkpoint_missing_a_shard_is_refused(saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which is missing"):
        Tensors(bad)


# -- the published configurations -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configurations_match_the_model_transformers_builds(name):
    """Each published size, built by transformers on the meta device: the tensors the check
    derives from the config are exactly the model's, and the facts give its memory needs."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from qwen3vl_triton.model.check import Report, facts
    from qwen3vl_triton.model.known import published_config, published_spec

    spec = published_spec(name)
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(published_config(name))
    state = {n: (tuple(p.shape), "BF16") for n, p in model.state_dict().items()}
    assert tensor_problems(spec, state) == []
    assert set(expected_tensors(spec)) == set(state)
    counts = parameter_counts(spec)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    broken = dict(state)
    del broken["model.visual.deepstack_merger_list.1.norm.weight"]
    assert "vision_config.deepstack_visual_indexes=[8, 16, 24] (level 1, block 16)" in tensor_problems(spec, broken)[0]
    report = Report(name, facts(spec))
    print(report.text())  # the memory each dtype needs (pytest -s)
    expected_total = {"30B": 31.07e9, "235B": 235.67e9}[name.split("-")[2]]
    assert abs(counts["total"] - expected_total) < 0.01e9


# -- end ids as stop words -----------------------------------------------------------------------------
def test_end_ids_travel_as_the_tensorrtllm_backends_stop_words_list(spec):
    from qwen3vl_triton.contract import request_from_contract, stop_word_ids, stop_words_list
    from qwen3vl_triton.errors import InputError

    words = stop_words_list([651, 649, 17])
    # the backend's _to_word_list_format for three one-token words: ids, then cumulative end offsets
    assert words.dtype == np.int32 and words.tolist() == [[[651, 649, 17], [1, 2, 3]]]
    assert stop_word_ids(words) == (651, 649, 17)
    assert stop_word_ids(np.array([[[5, 6, 0], [1, 2, -1]]])) == (5, 6)  # padded as the backend pads
    assert stop_word_ids(None) == ()
    with pytest.raises(InputError, match="one-token words only"):
        stop_word_ids(np.array([[[5, 6], [2, -1]]]))
    with pytest.raises(InputError, match="stop_words_list: must be \\[2, n\\]"):
        stop_word_ids(np.zeros((3, 4), np.int32))
    # the CPU engine's request, as the ensemble and the language model send it
    req, _ = request_from_contract({"input_ids": np.array([[1, 2, 3]], np.int32),
                                    "request_output_len": np.array([[4]], np.int32),
                                    "stop_words_list": stop_words_list(spec.end_ids)}, spec)
    assert req.end_id == spec.end_id and req.stop_ids == spec.end_ids == (651, 649)


def test_the_ensemble_sends_the_end_ids_to_tensorrt_llm_on_cpu_and_gpu(tiny_checkpoint, tmp_path, engine_dir):
    """preprocessing's stop_words_list goes to postprocessing, which forwards it to tensorrt_llm
    (its own request), whose CPU and GPU configurations both take it (tests/test_layouts.py serves
    it, and the language model's own request)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from qwen3vl_triton.contract import LLM_INPUT_NAMES
    from qwen3vl_triton.serve.repository import render

    for device in ("cpu", "gpu"):
        repo = render(tiny_checkpoint, tmp_path / device, device=device, topology="single",
                      engine_dir=engine_dir if device == "gpu" else None)
        configs = {m: text_format.Parse((repo / m / "config.pbtxt").read_text(), mc.ModelConfig())
                   for m in ("qwen3vl", "preprocessing", "postprocessing", "tensorrt_llm")}
        steps = {s.model_name: s for s in configs["qwen3vl"].ensemble_scheduling.step}
        assert (steps["preprocessing"].output_map["stop_words_list"]
                == steps["postprocessing"].input_map["stop_words_list"])
        assert LLM_INPUT_NAMES["stop_words_list"] == "stop_words_list"
        (pre,) = [o for o in configs["preprocessing"].output if o.name == "stop_words_list"]
        (post,) = [i for i in configs["postprocessing"].input if i.name == "stop_words_list"]
        (llm,) = [i for i in configs["tensorrt_llm"].input if i.name == "stop_words_list"]
        assert list(pre.dims) == list(post.dims) == list(llm.dims) == [2, -1]
        assert pre.data_type == post.data_type == llm.data_type == mc.TYPE_INT32


# -- one dtype setting ------------------------------------------------------------------------------------
def test_dtype_auto_is_the_checkpoints_dtype(tiny_checkpoint, tmp_path):
    from qwen3vl_triton.serve.repository import RenderError, Settings, render

    repo = render(tiny_checkpoint, tmp_path / "repo", topology="single", settings=Settings(dtype="auto"))
    assert 'key: "dtype" value: { string_value: "float32" }' in (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    bf16 = build_saved_checkpoint(tmp_path / "bf16", dtype="bfloat16", log=lambda *_: None)
    assert ModelSpec.load(bf16).serving_dtype("auto") == "bfloat16"
    repo = render(bf16, tmp_path / "repo2", topology="single", settings=Settings(dtype="auto"))
    assert 'key: "dtype" value: { string_value: "bfloat16" }' in (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "TYPE_BF16" in (repo / "vision_encoder" / "config.pbtxt").read_text()
    render(bf16, tmp_path / "repo3", topology="single", settings=Settings(dtype="float32"))  # served upcast
    fp16 = build_saved_checkpoint(tmp_path / "fp16", dtype="float16", log=lambda *_: None)
    with pytest.raises(RenderError, match="dtype auto \\(the checkpoint's float16\\): the CPU engine serves float32 "
                                          "or bfloat16"):
        render(fp16, tmp_path / "repo4", settings=Settings(dtype="auto"))


def test_a_checkpoint_another_process_wrote_meanwhile_is_kept(tmp_path):
    """Two servers started at once from one checkout both build the missing tiny checkpoint: the first
    complete one stays, the later one is dropped, and no reader sees the folder replaced."""
    from qwen3vl_triton.model.tiny import _written_whole

    out = tmp_path / "ckpt"
    with _written_whole(out, replace=False) as tmp:
        (tmp / "mine").write_text("x")
        out.mkdir()
        (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # this one's folder removed
    with _written_whole(out) as tmp:  # replace (the default): the new one wins
        (tmp / "mine").write_text("x")
    assert [p.name for p in out.iterdir()] == ["mine"]


def test_the_layout_table_of_the_docs_matches_what_the_writers_write(tmp_path):
    """docs/checkpoints.md's table of the two layouts, row by row, against the files the tiny writers
    produce (hub: build_checkpoint; transformers: build_saved_checkpoint, i.e. save_pretrained)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md").read_text(encoding="utf-8")
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("experts count", "rope", "chat template", "weights"):
            rows[cells[0]] = cells[1:]
    assert len(rows) == 4, rows
    hub = build_checkpoint(tmp_path / "hub", log=lambda *_: None)
    saved = build_saved_checkpoint(tmp_path / "saved", log=lambda *_: None)
    for path, column in ((hub, 0), (saved, 1)):
        text = json.loads((path / "config.json").read_text())["text_config"]
        files = {p.name for p in path.iterdir()}
        experts = "num_experts" if "num_experts" in text else "num_local_experts"
        assert f"`text_config.{experts}`" in rows["experts count"][column]
        assert ("`rope_scaling`" if "rope_scaling" in text else "`rope_parameters`") in rows["rope"][column]
        template = "`chat_template.jinja`" if "chat_template.jinja" in files else "`tokenizer_config.json`"
        assert template in rows["chat template"][column]
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
        assert rows["weights"][column].startswith("`model.safetensors`")
