"""The pre-flight check of a checkpoint: `qwen3vl-serve --check` (and the launcher before it starts
tritonserver).

It reads what serving reads -- the config, tokenizer, processor and generation config through
transformers (`ModelSpec.load`), and the safetensors headers (`Tensors`; no weight is read) --
derives from the config every tensor the model needs, with its shape, and compares: a missing
tensor, a wrong shape or a tensor the config does not account for is reported with the config
key that implies it. A checkpoint the engines cannot run (quantized weights, another
architecture) is refused with the reason. Then it prints the checkpoint's facts: layers, experts
and which layers are MoE, DeepStack levels, dtype, end ids, parameters and memory per dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qwen3vl_triton.model.checkpoint import SAFETENSORS_DTYPES, CheckpointError, ModelSpec, Tensors
from qwen3vl_triton.model.memory import memory_facts

LM = "model.language_model."
VISUAL = "model.visual."


@dataclass(frozen=True)
class Expected:
    """A tensor the config implies: its accepted shapes and the config keys that set them."""

    shapes: tuple[tuple[int, ...], ...]
    because: str
    required: bool = True


def _layer_kind(spec: ModelSpec, i: int) -> str:
    t = "text_config"
    rule = (f"{t}.num_experts={spec.num_experts}, {t}.decoder_sparse_step={spec.decoder_sparse_step}, "
            f"{t}.mlp_only_layers={list(spec.mlp_only_layers)}")
    return f"layer {i} is {'MoE' if spec.is_moe_layer(i) else 'dense'} by {rule}"


def expected_tensors(spec: ModelSpec) -> dict[str, Expected]:
    """Every tensor of `Qwen3VLMoeForConditionalGeneration` for this config, by checkpoint name.

    Written from the config (not from a model instance), so that a test can hold it against
    the model transformers builds for the same config."""
    t, v = "text_config", "vision_config"
    h, d, heads, kv, vocab = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.vocab_size
    text = spec.config.text_config
    out: dict[str, Expected] = {}

    def add(name: str, shape: tuple[int, ...], because: str, *alternatives: tuple[int, ...], required: bool = True):
        out[name] = Expected((shape, *alternatives), because, required)

    add(LM + "embed_tokens.weight", (vocab, h), f"{t}.vocab_size={vocab}, {t}.hidden_size={h}")
    add(LM + "norm.weight", (h,), f"{t}.hidden_size={h}")
    add("lm_head.weight", (vocab, h), f"{t}.vocab_size={vocab}, tie_word_embeddings={spec.tie_word_embeddings}",
        required=not spec.tie_word_embeddings)
    q_size = f"{t}.num_attention_heads={heads} x {t}.head_dim={d}"
    kv_size = f"{t}.num_key_value_heads={kv} x {t}.head_dim={d}"
    for i in range(spec.num_layers):
        p = f"{LM}layers.{i}."
        at = f" ({t}.num_hidden_layers={spec.num_layers})"
        add(p + "input_layernorm.weight", (h,), f"{t}.hidden_size={h}" + at)
        add(p + "post_attention_layernorm.weight", (h,), f"{t}.hidden_size={h}" + at)
        add(p + "self_attn.q_proj.weight", (heads * d, h), q_size + at)
        add(p + "self_attn.k_proj.weight", (kv * d, h), kv_size + at)
        add(p + "self_attn.v_proj.weight", (kv * d, h), kv_size + at)
        add(p + "self_attn.o_proj.weight", (h, heads * d), q_size + at)
        add(p + "self_attn.q_norm.weight", (d,), f"{t}.head_dim={d}" + at)
        add(p + "self_attn.k_norm.weight", (d,), f"{t}.head_dim={d}" + at)
        if text.attention_bias:
            bias = f"{t}.attention_bias=True"
            add(p + "self_attn.q_proj.bias", (heads * d,), bias)
            add(p + "self_attn.k_proj.bias", (kv * d,), bias)
            add(p + "self_attn.v_proj.bias", (kv * d,), bias)
            add(p + "self_attn.o_proj.bias", (h,), bias)
        kind = _layer_kind(spec, i)
        if spec.is_moe_layer(i):
            e, inter = spec.num_experts, spec.moe_intermediate_size
            moe = f"{kind}; {t}.moe_intermediate_size={inter}"
            add(p + "mlp.gate.weight", (e, h), kind)
            # transformers' layout [E, out, in] or the hub's [E, in, out] (checkpoint.experts_out_in)
            add(p + "mlp.experts.gate_up_proj", (e, 2 * inter, h), moe, (e, h, 2 * inter))
            add(p + "mlp.experts.down_proj", (e, h, inter), moe, (e, inter, h))
        else:
            inter = spec.intermediate_size
            dense = f"{kind}; {t}.intermediate_size={inter}"
            add(p + "mlp.gate_proj.weight", (inter, h), dense)
            add(p + "mlp.up_proj.weight", (inter, h), dense)
            add(p + "mlp.down_proj.weight", (h, inter), dense)

    vision = spec.config.vision_config
    hv, iv, out_h = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
    merged = hv * vision.spatial_merge_size ** 2
    hv_key = f"{v}.hidden_size={hv}"
    add(VISUAL + "patch_embed.proj.weight", (hv, vision.in_channels, vision.temporal_patch_size, vision.patch_size,
                                           vision.patch_size),
        f"{hv_key}, {v}.in_channels={vision.in_channels}, {v}.temporal_patch_size={vision.temporal_patch_size}, "
        f"{v}.patch_size={vision.patch_size}")
    add(VISUAL + "patch_embed.proj.bias", (hv,), hv_key)
    add(VISUAL + "pos_embed.weight", (vision.num_position_embeddings, hv),
        f"{v}.num_position_embeddings={vision.num_position_embeddings}, {hv_key}")
    for j in range(vision.depth):
        p = f"{VISUAL}blocks.{j}."
        at = f" ({v}.depth={vision.depth})"
        for norm in ("norm1", "norm2"):
            add(p + f"{norm}.weight", (hv,), hv_key + at)
            add(p + f"{norm}.bias", (hv,), hv_key + at)
        add(p + "attn.qkv.weight", (3 * hv, hv), hv_key + at)
        add(p + "attn.qkv.bias", (3 * hv,), hv_key + at)
        add(p + "attn.proj.weight", (hv, hv), hv_key + at)
        add(p + "attn.proj.bias", (hv,), hv_key + at)
        mlp = f"{v}.intermediate_size={iv}, {hv_key}" + at
        add(p + "mlp.linear_fc1.weight", (iv, hv), mlp)
        add(p + "mlp.linear_fc1.bias", (iv,), mlp)
        add(p + "mlp.linear_fc2.weight", (hv, iv), mlp)
        add(p + "mlp.linear_fc2.bias", (hv,), mlp)
    merge = f"{hv_key} x {v}.spatial_merge_size={vision.spatial_merge_size}^2, {v}.out_hidden_size={out_h}"
    mergers = [(VISUAL + "merger.", hv, merge)]
    for k, block in enumerate(vision.deepstack_visual_indexes or ()):
        mergers.append((f"{VISUAL}deepstack_merger_list.{k}.", merged,
                        f"{v}.deepstack_visual_indexes={list(vision.deepstack_visual_indexes)} (level {k}, "
                        f"block {block}); {merge}"))
    for p, norm, because in mergers:  # the DeepStack mergers normalize after the spatial merge
        add(p + "norm.weight", (norm,), because)
        add(p + "norm.bias", (norm,), because)
        add(p + "linear_fc1.weight", (merged, merged), because)
        add(p + "linear_fc1.bias", (merged,), because)
        add(p + "linear_fc2.weight", (out_h, merged), because)
        add(p + "linear_fc2.bias", (out_h,), because)
    return out


def config_problems(spec: ModelSpec) -> list[str]:
    """Inconsistencies of the config itself that transformers accepts but serving cannot."""
    problems = []
    vision = spec.config.vision_config
    indexes = list(vision.deepstack_visual_indexes or ())
    if any(not 0 <= k < vision.depth for k in indexes) or len(set(indexes)) != len(indexes):
        problems.append(f"vision_config.deepstack_visual_indexes {indexes} must be distinct blocks of "
                        f"vision_config.depth={vision.depth}")
    if spec.deepstack_levels > spec.num_layers:
        problems.append(f"{spec.deepstack_levels} DeepStack levels (vision_config.deepstack_visual_indexes) need as "
                        f"many decoder layers; text_config.num_hidden_layers={spec.num_layers}")
    if spec.vision_out_hidden_size != spec.hidden_size:
        problems.append(f"vision_config.out_hidden_size={spec.vision_out_hidden_size} must equal "
                        f"text_config.hidden_size={spec.hidden_size} (image rows replace token embeddings)")
    if spec.num_experts and not 0 < spec.experts_per_token <= spec.num_experts:
        problems.append(f"text_config.num_experts_per_tok={spec.experts_per_token} must be in [1, "
                        f"text_config.num_experts={spec.num_experts}]")
    if spec.num_heads % spec.num_kv_heads:
        problems.append(f"text_config.num_attention_heads={spec.num_heads} is not a multiple of "
                        f"text_config.num_key_value_heads={spec.num_kv_heads}")
    return problems


def tensor_problems(spec: ModelSpec, found: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Compare the checkpoint's tensors (name -> (shape, safetensors dtype)) with the config's."""
    quantized = sorted(n for n, (_, dt) in found.items() if dt not in SAFETENSORS_DTYPES)
    if quantized:
        n = quantized[0]
        return [f"quantized weights: {n} is {found[n][1]} ({len(quantized)} tensor(s) not F32/F16/BF16); the engines "
                "serve unquantized float32/float16/bfloat16 weights"]
    problems = []
    expected = expected_tensors(spec)
    for name, want in expected.items():
        if name not in found:
            if want.required:
                problems.append(f"{name} is missing ({want.because})")
            continue
        shape = found[name][0]
        if shape not in want.shapes:
            accepted = " or ".join(str(list(s)) for s in want.shapes)
            problems.append(f"{name} has shape {list(shape)}, expected {accepted} ({want.because})")
    extra = sorted(n for n in found if n not in expected)
    for name in extra[:5]:
        layer = _layer_of(name)
        why = f"; {_layer_kind(spec, layer)}" if layer is not None and ".mlp." in name else ""
        problems.append(f"{name} is not part of the model this config describes{why}")
    if len(extra) > 5:
        problems.append(f"... and {len(extra) - 5} more tensors the config does not account for")
    return problems


def _layer_of(name: str) -> int | None:
    if not name.startswith(LM + "layers."):
        return None
    part = name[len(LM + "layers."):].split(".", 1)[0]
    return int(part) if part.isdigit() else None


@dataclass
class Report:
    """What the check found: facts to print, and problems (any problem fails the check)."""

    path: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None  # None when the checkpoint could not be read

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        width = max((len(k) for k, _ in self.facts), default=0)
        lines = [f"checkpoint {self.path}"]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in self.facts]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("OK: every tensor the config implies is present with its shape")
        return "\n".join(lines)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _ranges(layers: tuple[int, ...]) -> str:
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts) or "none"


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters of the language model, the vision tower, and those one token uses (active)."""
    expected = expected_tensors(spec)
    sizes = {n: math.prod(e.shapes[0]) for n, e in expected.items() if e.required}
    language = sum(s for n, s in sizes.items() if not n.startswith(VISUAL))
    vision = sum(s for n, s in sizes.items() if n.startswith(VISUAL))
    experts = sum(s for n, s in sizes.items() if ".mlp.experts." in n)
    unused = experts * (1 - spec.experts_per_token / spec.num_experts) if spec.num_experts else 0
    return {"language": language, "vision": vision, "total": language + vision, "active": round(language - unused)}


def facts(spec: ModelSpec, stored: dict[str, int] | None = None, end_names: dict[int, str] | None = None,
          host_bytes: int | None = None, sequences: int = 16, max_len: int = 4096) -> list[tuple[str, str]]:
    """The checkpoint's facts, as printed by --check; the memory of each serving dtype with KV
    cells for `sequences` x `max_len` tokens (model/memory.py)."""
    vision = spec.config.vision_config
    counts = parameter_counts(spec)
    moe = spec.moe_layers
    dense = tuple(i for i in range(spec.num_layers) if i not in moe)
    out = [
        ("architecture", f"{', '.join(spec.config.architectures or ['Qwen3VLMoeForConditionalGeneration'])} "
                         f"({spec.config.model_type})"),
        ("language model", f"{spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads / "
                           f"{spec.num_kv_heads} KV heads x {spec.head_dim}, vocab {spec.vocab_size}, "
                           f"context {spec.max_position_embeddings}, tied embeddings {spec.tie_word_embeddings}"),
        ("experts", f"{spec.num_experts} per MoE layer, {spec.experts_per_token} per token, expert intermediate "
                    f"{spec.moe_intermediate_size}" if moe else "none (every layer is dense)"),
        ("MoE layers", f"{len(moe)} of {spec.num_layers}: {_ranges(moe)}; dense: {_ranges(dense)} (decoder_sparse_step "
                       f"{spec.decoder_sparse_step}, mlp_only_layers {list(spec.mlp_only_layers)})"),
        ("vision tower", f"{vision.depth} blocks, hidden {vision.hidden_size}, patch {spec.patch_size}, merge "
                         f"{spec.spatial_merge_size}"),
        ("DeepStack", f"{spec.deepstack_levels} levels from vision blocks {list(vision.deepstack_visual_indexes)}, "
                      f"added after decoder layers 0-{spec.deepstack_levels - 1}" if spec.deepstack_levels else "none"),
        ("dtype", spec.dtype + (" (stored: " + ", ".join(f"{k} {_billions(v)}" for k, v in sorted(stored.items()))
                                + ")" if stored else "")),
    ]
    if spec.end_id is not None:
        names = end_names or {}
        out.append(("end ids", ", ".join(f"{i} {names[i]}" if i in names else str(i) for i in spec.end_ids)))
        out.append(("image pixels", f"{spec.min_pixels}-{spec.max_pixels} per image"))
        if spec.video_max_pixels is not None:
            out.append(("video", f"{spec.video_min_pixels}-{spec.video_max_pixels} pixels per video (all frames kept), "
                                 f"{spec.video_fps:g} frames per second, {spec.video_min_frames}-"
                                 f"{spec.video_max_frames} frames, in groups of {spec.temporal_patch_size}"))
    out.append(("parameters", f"{_billions(counts['total'])} (language {_billions(counts['language'])}, vision "
                              f"{_billions(counts['vision'])}); active per token {_billions(counts['active'])}"))
    out += memory_facts(spec, host_bytes, sequences, max_len)
    return out


def check_checkpoint(path: str | Path, sequences: int = 16, max_len: int = 4096) -> Report:
    """The whole pre-flight check of a checkpoint directory (no weight is read); the memory
    lines count KV cells for `sequences` x `max_len` tokens (the serving settings')."""
    import psutil

    report = Report(str(path))
    try:
        spec = ModelSpec.load(path)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.spec = spec
    try:
        tensors = Tensors(path)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        tensors = None
    report.problems += config_problems(spec)
    if tensors is not None:
        found = {n: (i.shape, i.dtype) for n, i in tensors.info.items()}
        report.problems += tensor_problems(spec, found)
    report.facts = facts(spec, tensors.dtypes() if tensors else None, _token_names(path, spec.end_ids),
                         psutil.virtual_memory().total, sequences, max_len)
    return report


def _token_names(path, ids) -> dict[int, str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return {i: tokenizer.convert_ids_to_tokens(i) for i in ids}
