"""The memory a serving dtype needs: weights (language model and vision tower) and KV cells.

Serving dtypes and what each holds (the CPU engine; `--set dtype=...`):

    float32   language model f32 (torch or the ggml runner's f32 GGUF), vision tower f32, KV cells f32
    bfloat16  language model bf16, vision tower bf16, KV cells bf16 (torch) / f16 (ggml): 2 bytes
    q8_0      language model Q8_0 (ggml runner only), vision tower f32, KV cells f16
    q4_k      language model Q4_K_M (ggml runner only), vision tower f32, KV cells f16

The quantized sizes follow what llama.cpp writes, tensor by tensor (`language_bytes`): norms and
the MoE routers stay f32 (llama.cpp never quantizes 1-D tensors or `ffn_gate_inp`); Q8_0 stores 32
weights in 34 bytes; Q4_K_M (`llama-quant.cpp`, LLAMA_FTYPE_MOSTLY_Q4_K_M) is Q4_K (144 bytes per
256 weights) except the output matrix, and `attn_v` / `ffn_down` in the layers its `use_more_bits`
picks (the first and last eighth, and every third between), which are Q6_K (210 bytes per 256).
A dimension that is not a multiple of a block (tiny test models) makes llama.cpp fall back to
another type: there the figure is an estimate.

KV cells are allocated up front for every sequence the engine runs at once (`engine_max_batch`)
at the full context (`max_seq_len`, which llama.cpp rounds up to 256 cells per sequence).
"""

from __future__ import annotations

import math

from qwen3vl_triton.model.checkpoint import ModelSpec

DTYPES = ("float32", "bfloat16", "q8_0", "q4_k")
QUANTIZED = ("q8_0", "q4_k")  # served by the ggml runner only

# bytes per weight of each storage type
_F32, _BF16 = 4.0, 2.0
_Q8_0 = 34 / 32
_Q4_K = 144 / 256
_Q6_K = 210 / 256
GIB = 2 ** 30


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits (Q4_K_M)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def language_bytes(spec: ModelSpec, dtype: str) -> float:
    """Bytes of the language model's weights stored as `dtype`."""
    h, d, vocab = spec.hidden_size, spec.head_dim, spec.vocab_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    per = {"float32": _F32, "bfloat16": _BF16, "q8_0": _Q8_0, "q4_k": _Q4_K}[dtype]
    small = _F32 if dtype in QUANTIZED else per  # 1-D tensors and routers
    n = spec.num_layers
    total = vocab * h * per  # token embeddings
    total += 0 if spec.tie_word_embeddings else vocab * h * (_Q6_K if dtype == "q4_k" else per)
    total += h * small  # final norm
    for i in range(n):
        more = dtype == "q4_k" and use_more_bits(i, n)
        v = _Q6_K if more else per
        total += (q * h + kv * h + q * h) * per + kv * h * v  # q, k, o; v
        total += (2 * h + 2 * d) * small  # input/post-attention norms, q/k norms
        if spec.is_moe_layer(i):
            e, inter = spec.num_experts, spec.moe_intermediate_size
            total += e * h * small  # router
            total += e * 2 * inter * h * per + e * inter * h * (_Q6_K if more else per)  # gate+up, down
        else:
            inter = spec.intermediate_size
            total += 2 * inter * h * per + inter * h * (_Q6_K if more else per)
    return total


def vision_bytes(spec: ModelSpec, dtype: str) -> float:
    from qwen3vl_triton.model.check import parameter_counts

    return parameter_counts(spec)["vision"] * (_BF16 if dtype == "bfloat16" else _F32)


def kv_bytes_per_token(spec: ModelSpec, dtype: str) -> float:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * (_F32 if dtype == "float32" else 2)


def kv_cells(sequences: int, max_len: int) -> int:
    """KV cells allocated for `sequences` at `max_len` tokens each (256-cell granularity)."""
    return sequences * math.ceil(max_len / 256) * 256


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def needs(spec: ModelSpec, dtype: str, sequences: int, max_len: int) -> dict[str, float]:
    lang, vis = language_bytes(spec, dtype), vision_bytes(spec, dtype)
    kv = kv_bytes_per_token(spec, dtype) * kv_cells(sequences, max_len)
    return {"language": lang, "vision": vis, "kv_per_token": kv_bytes_per_token(spec, dtype), "kv": kv,
            "total": lang + vis + kv}


def memory_facts(spec: ModelSpec, host_bytes: int | None, sequences: int = 16, max_len: int = 4096,
                 usable: float = 0.8) -> list[tuple[str, str]]:
    """One --check line per serving dtype: weights, KV cells for `sequences` x `max_len` tokens,
    and whether the total fits `usable` of the host's RAM."""
    out = []
    for dtype in DTYPES:
        n = needs(spec, dtype, sequences, max_len)
        line = (f"weights {fmt_bytes(n['language'] + n['vision'])} (language {fmt_bytes(n['language'])}, vision "
                f"{fmt_bytes(n['vision'])}); KV {fmt_bytes(n['kv_per_token'])}/token, "
                f"{fmt_bytes(n['kv'])} for {sequences} x {max_len} tokens; total {fmt_bytes(n['total'])}")
        if host_bytes:
            line += ": fits" if n["total"] <= usable * host_bytes else ": does not fit"
        out.append((f"memory {dtype}", line + (" (ggml runner)" if dtype in QUANTIZED else "")))
    if host_bytes:
        out.append(("this host", f"{fmt_bytes(host_bytes)} RAM; a dtype fits when its total is within "
                                 f"{usable:.0%} of it"))
    return out
