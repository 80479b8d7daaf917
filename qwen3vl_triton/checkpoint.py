"""Reading a Hugging Face Qwen3-VL-MoE checkpoint directory.

Everything the serving stack needs to know about a model -- sizes, token ids, dtypes -- is read
here from `config.json`, `generation_config.json`, `tokenizer_config.json` and
`preprocessor_config.json`. Nothing else in the package hard-codes a model fact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or not a Qwen3-VL-MoE checkpoint."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class ModelSpec:
    """The facts of one checkpoint that the runtime needs, read once."""

    path: Path
    # language model
    vocab_size: int  # rows of the embedding table; prompt-table (fake) ids start here
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    intermediate_size: int
    mlp_only_layers: tuple[int, ...]
    decoder_sparse_step: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # dtype the weights were saved in
    # vision tower
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    vision_out_hidden_size: int
    deepstack_levels: int
    # tokens
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    end_id: int  # end-of-turn token of the chat template
    end_ids: tuple[int, ...]  # every id that ends generation: end_id first, then generation_config's eos ids
    pad_id: int
    # preprocessing bounds (pixels)
    min_pixels: int
    max_pixels: int

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @property
    def merge_factor(self) -> int:
        """Image side length, in pixels, covered by one merged image token."""
        return self.patch_size * self.spatial_merge_size

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        cfg = _read_json(path / "config.json")
        if cfg.get("model_type") != "qwen3_vl_moe":
            raise CheckpointError(
                f"{path}/config.json has model_type {cfg.get('model_type')!r}, expected 'qwen3_vl_moe'"
            )
        text, vision = cfg["text_config"], cfg["vision_config"]
        tok_cfg = _read_json(path / "tokenizer_config.json")
        pre_cfg = _read_json(path / "preprocessor_config.json")
        vocab = _read_json(path / "tokenizer.json")
        token_ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}

        def token_id(name: str) -> int:
            content = tok_cfg.get(name)
            if isinstance(content, dict):
                content = content.get("content")
            if content is None:
                raise CheckpointError(f"tokenizer_config.json has no {name}")
            if content not in token_ids:
                raise CheckpointError(f"{name} {content!r} is not an added token of tokenizer.json")
            return token_ids[content]

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text.get("rope_theta"))
        if rope_theta is None:
            raise CheckpointError("config.json text_config has no rope_theta")
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        section = tuple(rope.get("mrope_section", ()))
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise CheckpointError(
                f"mrope_section {list(section)} must have 3 entries summing to head_dim/2 = {head_dim // 2}"
            )
        size = pre_cfg.get("size") or {}
        min_pixels = pre_cfg.get("min_pixels") or size.get("shortest_edge")
        max_pixels = pre_cfg.get("max_pixels") or size.get("longest_edge")
        if not min_pixels or not max_pixels:
            raise CheckpointError("preprocessor_config.json gives no min/max pixel bounds")
        if pre_cfg.get("patch_size", vision["patch_size"]) != vision["patch_size"]:
            raise CheckpointError("preprocessor_config.json patch_size disagrees with vision_config.patch_size")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "bfloat16"
        pad_name = "pad_token" if tok_cfg.get("pad_token") else "eos_token"
        end_id = token_id("eos_token")
        gen_path = path / "generation_config.json"
        gen_eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        end_ids = tuple(dict.fromkeys([end_id, *(int(i) for i in gen_eos)]))
        return cls(
            path=path,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=head_dim,
            num_experts=text.get("num_experts", 0),
            experts_per_token=text.get("num_experts_per_tok", 0),
            moe_intermediate_size=text.get("moe_intermediate_size", 0),
            intermediate_size=text["intermediate_size"],
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
            decoder_sparse_step=text.get("decoder_sparse_step", 1),
            rms_norm_eps=text["rms_norm_eps"],
            rope_theta=float(rope_theta),
            mrope_section=section,  # type: ignore[arg-type]
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            max_position_embeddings=text["max_position_embeddings"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            dtype=dtype,
            patch_size=vision["patch_size"],
            temporal_patch_size=vision["temporal_patch_size"],
            spatial_merge_size=vision["spatial_merge_size"],
            vision_out_hidden_size=vision["out_hidden_size"],
            deepstack_levels=len(vision.get("deepstack_visual_indexes", ())),
            image_token_id=cfg["image_token_id"],
            vision_start_token_id=cfg["vision_start_token_id"],
            vision_end_token_id=cfg["vision_end_token_id"],
            end_id=end_id,
            end_ids=end_ids,
            pad_id=token_id(pad_name),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )


def iter_tensors(path: str | Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name without `prefix`, tensor) for every tensor whose name starts with `prefix`,
    across all safetensors shards of the checkpoint."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    yield name[len(prefix):], f.get_tensor(name)


def load_state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    state = dict(iter_tensors(path, prefix))
    if not state:
        raise CheckpointError(f"no tensors named {prefix}* in {path}")
    return state
