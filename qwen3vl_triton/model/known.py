"""The published Qwen3-VL-MoE sizes: their `config.json` values, and what the pre-flight check
says about each (structure, parameters, memory).

No weights of these models can be downloaded here, so the table holds the config.json values as
published on the Hugging Face hub, transcribed from these sources:

- Qwen/Qwen3-VL-30B-A3B-Instruct: an inline copy of the hub's config.json (revision 1fc78ad)
  in a public Rust port's parser test; its text values agree with NVIDIA Megatron's model
  arguments for Qwen3-VL-30B-A3B-Instruct (48 layers, hidden 2048, FFN 6144, 32 heads, 4 KV
  groups, kv channels 128, rotary base 5000000, vocab 151936, seq length 262144, expert FFN 768,
  top-8 of 128 experts, untied embeddings).
- Qwen/Qwen3-VL-235B-A22B-Instruct: a public summary of the hub's config.json (94 layers,
  hidden 4096, FFN 12288, heads Q=64 KV=4, head_dim 128, vocab 151936, rope_theta 5000000,
  mrope_section [24, 20, 20], 128 experts top-8, moe_intermediate_size 1536, context 262144;
  vision: 27 layers, hidden 1152, 16 heads, FFN 4304, patch 16, temporal patch 2, out 4096),
  agreeing with NVIDIA Megatron's model arguments for Qwen3-VL-235B-A22B-Instruct. Keys the
  sources do not list (tie_word_embeddings false, the vision tower's remaining keys, the token
  ids) are those of the 30B-A3B file: the two share the vision tower and the tokenizer, and the
  text model of both is Qwen3-MoE, whose 235B-A22B release has untied embeddings.
- The -Thinking releases are the same architectures post-trained differently (the Qwen3-VL
  model cards: "Instruct and reasoning-enhanced Thinking editions"); their config.json values
  are the Instruct ones.

    python -m qwen3vl_triton.model.known      # the pre-flight facts of every published size
"""

from __future__ import annotations

import copy
import sys

_VISION = {
    "deepstack_visual_indexes": [8, 16, 24],
    "depth": 27,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "in_channels": 3,
    "intermediate_size": 4304,
    "model_type": "qwen3_vl_moe",
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _config(*, layers: int, hidden: int, intermediate: int, heads: int, moe_intermediate: int) -> dict:
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl_moe",
        "text_config": {
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": 128,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "max_position_embeddings": 262144,
            "mlp_only_layers": [],
            "model_type": "qwen3_vl_moe_text",
            "moe_intermediate_size": moe_intermediate,
            "norm_topk_prob": True,
            "num_attention_heads": heads,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_hidden_layers": layers,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": False,
        "video_token_id": 151656,
        "vision_config": {**_VISION, "out_hidden_size": hidden},
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


_30B = _config(layers=48, hidden=2048, intermediate=6144, heads=32, moe_intermediate=768)
_235B = _config(layers=94, hidden=4096, intermediate=12288, heads=64, moe_intermediate=1536)

# hub name -> config.json
PUBLISHED: dict[str, dict] = {
    "Qwen/Qwen3-VL-30B-A3B-Instruct": _30B,
    "Qwen/Qwen3-VL-30B-A3B-Thinking": _30B,
    "Qwen/Qwen3-VL-235B-A22B-Instruct": _235B,
    "Qwen/Qwen3-VL-235B-A22B-Thinking": _235B,
}
# the published weights are bfloat16 (the hub lists their tensor type as BF16)
PUBLISHED_DTYPE = "bfloat16"


def published_config(name: str):
    """The transformers config (`Qwen3VLMoeConfig`) of a published size, read as from_pretrained
    reads its config.json."""
    from transformers import Qwen3VLMoeConfig

    if name not in PUBLISHED:
        raise KeyError(f"unknown published configuration {name!r}; known: {', '.join(PUBLISHED)}")
    return Qwen3VLMoeConfig.from_dict(copy.deepcopy(PUBLISHED[name]))


def published_spec(name: str):
    from qwen3vl_triton.model.checkpoint import ModelSpec

    return ModelSpec.from_config(published_config(name), dtype=PUBLISHED_DTYPE)


def main() -> int:
    import psutil

    from qwen3vl_triton.model.check import Report, config_problems, facts

    for name in PUBLISHED:
        spec = published_spec(name)
        report = Report(name, facts(spec, host_bytes=psutil.virtual_memory().total), config_problems(spec))
        print(report.text().replace("OK: every tensor the config implies is present with its shape",
                                    "OK: the configuration is consistent"), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
