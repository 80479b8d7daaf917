"""Hugging Face Qwen3-VL-MoE language model <-> TensorRT-LLM checkpoint.

The output is what TensorRT-LLM 1.2's engine flow loads with `QWenForCausalLM.from_checkpoint`
(`trtllm-build --checkpoint_dir`): `config.json` (a `QWenConfig`, `qwen_type` "qwen3_moe") and
`rank0.safetensors` with TensorRT-LLM's parameter names and layouts:

    transformer.vocab_embedding.weight                 [V, H]
    transformer.layers.{i}.input_layernorm.weight      [H]
    transformer.layers.{i}.attention.qkv.weight        [(heads + 2 kv_heads) d, H]  rows q | k | v
    transformer.layers.{i}.attention.dense.weight      [H, heads d]
    transformer.layers.{i}.attention.q_layernorm.weight, k_layernorm.weight      [d]
    transformer.layers.{i}.post_layernorm.weight       [H]
    MoE layers (the MixtureOfExperts plugin):
    transformer.layers.{i}.mlp.router.weight           [E, H]      float32 (routing stays fp32)
    transformer.layers.{i}.mlp.fc.weight               [E, 2I, H]  rows up | gate (activation on gate)
    transformer.layers.{i}.mlp.proj.weight             [E, H, I]
    dense layers (`mlp_only_layers`, GatedMLP):
    transformer.layers.{i}.mlp.fc.weight               [I, H]      gate_proj (activation applied)
    transformer.layers.{i}.mlp.gate.weight             [I, H]      up_proj
    transformer.layers.{i}.mlp.proj.weight             [H, I]      down_proj
    transformer.ln_f.weight                            [H]
    lm_head.weight                                     [V, H]

Differences from what `QWenConfig.from_hugging_face` would write for a text-only Qwen3-MoE: M-RoPE
is on (`position_embedding_type` "mrope": the engine reads the precomputed
`mrope_rotary_cos_sin`), the MoE renormalizes the top-k weights (Qwen3-VL-MoE's router always
does; `from_hugging_face` writes NONE), and `deepstack_levels` records how many DeepStack levels
the engine adds after layers 0, 1, ...

The tensors are streamed: the safetensors header is computed first (on meta tensors, by the same
code that converts), then each layer is converted and written, so memory holds one layer at a
time. `hf_tensors` is the inverse, used to check a converted checkpoint with the CPU engine.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import safe_open

from qwen3vl_triton.model.checkpoint import CheckpointError, ModelSpec, Tensors, experts_out_in, torch_dtype

ARCHITECTURE = "QWenForCausalLM"
QWEN_TYPE = "qwen3_moe"
ROUTER_DTYPE = torch.float32
# tensorrt_llm.layers.MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE: softmax over the top-k
# router logits, which equals Qwen3-VL-MoE's softmax -> top-k -> divide by the sum.
MOE_RENORMALIZE = 1

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

LM_PREFIX = "model.language_model."


def trtllm_config(spec: ModelSpec, dtype: str, max_position_embeddings: int | None = None) -> dict:
    """The checkpoint's `config.json` (a `QWenConfig` as `PretrainedConfig.from_dict` reads it)."""
    torch_dtype(dtype)  # validates the name
    positions = max_position_embeddings or spec.max_position_embeddings
    return {
        "architecture": ARCHITECTURE,
        "qwen_type": QWEN_TYPE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "norm_epsilon": spec.rms_norm_eps,
        "hidden_act": "swiglu",  # the MoE plugin's gated activation; dense layers use silu
        "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": 0,
        "moe": {
            "num_experts": spec.num_experts,
            "top_k": spec.experts_per_token,
            "normalization_mode": MOE_RENORMALIZE,
        },
        "mlp_only_layers": list(spec.mlp_only_layers),
        "decoder_sparse_step": spec.decoder_sparse_step,
        "attn_bias": False,
        "mlp_bias": False,
        "position_embedding_type": "mrope",
        "max_position_embeddings": positions,
        "rotary_embedding_dim": spec.rotary_dim,
        "rotary_base": spec.rope_theta,
        # "type" selects RotaryScalingType.mrope; the sections are informative only, because the
        # engine takes the rotary table precomputed (qwen3vl_triton.model.mrope).
        "rotary_scaling": {
            "type": "mrope",
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": spec.mrope_interleaved,
        },
        "seq_length": positions,
        "use_logn_attn": False,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "deepstack_levels": spec.deepstack_levels,
    }


class _Source:
    """The checkpoint's language-model tensors by Hugging Face name, read lazily across shards.

    `meta=True` yields meta tensors of the right shape and dtype: the conversion then computes
    the output layout without reading any data.
    """

    def __init__(self, path: Path, meta: bool = False):
        self.meta = meta
        self._tensors = Tensors(path)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __call__(self, name: str) -> torch.Tensor:
        return self._tensors.meta(name) if self.meta else self._tensors.get(name)


def _layer(source: _Source, spec: ModelSpec, i: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """TensorRT-LLM tensors of decoder layer `i`."""
    src, dst = f"{LM_PREFIX}layers.{i}.", f"transformer.layers.{i}."
    h, inter = spec.hidden_size, spec.moe_intermediate_size
    if any(f"{src}self_attn.{proj}.bias" in source for proj in ("q_proj", "k_proj", "v_proj", "o_proj")):
        # QWenDecoderLayer has no attention biases for qwen3_moe (attn_bias False, dense_bias False)
        raise CheckpointError(f"layer {i}: attention biases are not supported by QWenForCausalLM/qwen3_moe")

    def w(name: str, out_dtype: torch.dtype = dtype) -> torch.Tensor:
        return source(src + name).to(out_dtype)

    yield dst + "input_layernorm.weight", w("input_layernorm.weight")
    qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")])
    yield dst + "attention.qkv.weight", qkv
    yield dst + "attention.dense.weight", w("self_attn.o_proj.weight")
    yield dst + "attention.q_layernorm.weight", w("self_attn.q_norm.weight")
    yield dst + "attention.k_layernorm.weight", w("self_attn.k_norm.weight")
    yield dst + "post_layernorm.weight", w("post_attention_layernorm.weight")
    if spec.is_moe_layer(i):
        yield dst + "mlp.router.weight", w("mlp.gate.weight", ROUTER_DTYPE)
        # [E, 2I, H] rows gate | up, and [E, H, I], whichever layout the checkpoint stores
        gate_up = experts_out_in(w("mlp.experts.gate_up_proj"), 2 * inter, h, src + "mlp.experts.gate_up_proj")
        down = experts_out_in(w("mlp.experts.down_proj"), h, inter, src + "mlp.experts.down_proj")
        gate, up = gate_up.split(inter, dim=1)  # each [E, I, H]
        yield dst + "mlp.fc.weight", torch.cat([up, gate], dim=1).contiguous()
        yield dst + "mlp.proj.weight", down.contiguous()
    else:
        yield dst + "mlp.fc.weight", w("mlp.gate_proj.weight")
        yield dst + "mlp.gate.weight", w("mlp.up_proj.weight")
        yield dst + "mlp.proj.weight", w("mlp.down_proj.weight")


def _tensors(source: _Source, spec: ModelSpec, dtype: torch.dtype,
             on_layer: Callable[[int], None] = lambda i: None) -> Iterator[tuple[str, torch.Tensor]]:
    """All TensorRT-LLM tensors, in file order; `on_layer(i)` is called after layer i."""
    embed = source(LM_PREFIX + "embed_tokens.weight")
    yield "transformer.vocab_embedding.weight", embed.to(dtype)
    for i in range(spec.num_layers):
        yield from _layer(source, spec, i, dtype)
        on_layer(i)
    yield "transformer.ln_f.weight", source(LM_PREFIX + "norm.weight").to(dtype)
    if "lm_head.weight" in source:
        yield "lm_head.weight", source("lm_head.weight").to(dtype)
    elif spec.tie_word_embeddings:
        yield "lm_head.weight", embed.to(dtype)
    else:
        raise CheckpointError("lm_head.weight is missing and the embeddings are not tied")


class _SafetensorsWriter:
    """Writes a safetensors file whose header is known before the data (streaming)."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt in layout:
            size = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dt],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._layout = iter(layout)
        self._file = path.open("wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = next(self._layout, None)
        if want is None or (name, tuple(tensor.shape), tensor.dtype) != want:
            raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the header {want}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))

    def close_quietly(self) -> None:
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if next(self._layout, None) is not None:
            raise RuntimeError("the conversion stopped before the last tensor of the header")


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                       max_position_embeddings: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Write `config.json` and `rank0.safetensors` of the TensorRT-LLM checkpoint to `out_dir`.

    `max_position_embeddings` (default: the model's) sets the rows of the engine's
    `mrope_rotary_cos_sin` input; it must be at least the engine's max_seq_len.
    """
    spec = ModelSpec.load(hf_dir)
    out_dtype = torch_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"[convert] {spec.path} -> {out} ({dtype}, {spec.num_layers} layers, {spec.num_experts} experts)")

    layout = [(name, tuple(t.shape), t.dtype) for name, t in _tensors(_Source(spec.path, meta=True), spec, out_dtype)]
    tmp = out / "rank0.safetensors.partial"
    writer = _SafetensorsWriter(tmp, layout)

    def progress(i: int) -> None:
        log(f"[convert] layer {i + 1}/{spec.num_layers} ({time.time() - t0:.1f}s)")

    try:
        for name, tensor in _tensors(_Source(spec.path), spec, out_dtype, progress):
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.close_quietly()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out / "rank0.safetensors")
    config = trtllm_config(spec, dtype, max_position_embeddings)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log(f"[convert] wrote {len(layout)} tensors, {writer.total_bytes / 2**20:.1f} MiB in {time.time() - t0:.1f}s")
    return out


def hf_tensors(tensors: Mapping[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse mapping: a converted checkpoint's tensors by Hugging Face name, hub layout
    (fused experts [E, H, 2I] and [E, I, H]), in the dtypes they were converted to."""
    out = {LM_PREFIX + "embed_tokens.weight": tensors["transformer.vocab_embedding.weight"],
           LM_PREFIX + "norm.weight": tensors["transformer.ln_f.weight"],
           "lm_head.weight": tensors["lm_head.weight"]}
    heads, kv_heads, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"transformer.layers.{i}.", f"{LM_PREFIX}layers.{i}."
        q, k, v = tensors[src + "attention.qkv.weight"].split([heads * d, kv_heads * d, kv_heads * d])
        out.update({
            dst + "input_layernorm.weight": tensors[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": tensors[src + "post_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": tensors[src + "attention.dense.weight"],
            dst + "self_attn.q_norm.weight": tensors[src + "attention.q_layernorm.weight"],
            dst + "self_attn.k_norm.weight": tensors[src + "attention.k_layernorm.weight"],
        })
        if src + "mlp.router.weight" in tensors:
            up, gate = tensors[src + "mlp.fc.weight"].chunk(2, dim=1)  # each [E, I, H]
            out[dst + "mlp.gate.weight"] = tensors[src + "mlp.router.weight"]
            out[dst + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).transpose(1, 2)
            out[dst + "mlp.experts.down_proj"] = tensors[src + "mlp.proj.weight"].transpose(1, 2)
        else:
            out[dst + "mlp.gate_proj.weight"] = tensors[src + "mlp.fc.weight"]
            out[dst + "mlp.up_proj.weight"] = tensors[src + "mlp.gate.weight"]
            out[dst + "mlp.down_proj.weight"] = tensors[src + "mlp.proj.weight"]
    return out


def load_hf_tensors(trtllm_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read a converted checkpoint back as Hugging Face tensors (see `hf_tensors`)."""
    path = Path(trtllm_dir)
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "rank0.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return hf_tensors(tensors, config)
