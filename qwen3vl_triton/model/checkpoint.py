"""Reading a Hugging Face Qwen3-VL-MoE checkpoint directory.

Everything the serving stack needs to know about a model -- sizes, token ids, dtypes -- is read
here, once, and always through transformers: `config.json` by `AutoConfig` (so aliases, defaults
and renamed keys resolve as transformers resolves them: `num_experts` / `num_local_experts`,
`rope_scaling` + `rope_theta` / `rope_parameters`, ...), the tokenizer by `AutoTokenizer`, the
image processor by `AutoImageProcessor`, `generation_config.json` by `GenerationConfig`. The
safetensors are indexed from their headers (`Tensors`); weights are read only when asked for.
Nothing else in the package parses these files or hard-codes a model fact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SERVING_DTYPES = tuple(_DTYPES)

MODEL_TYPE = "qwen3_vl_moe"
ARCHITECTURES = ("Qwen3VLMoeForConditionalGeneration",)
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch; only these are served (anything else is a quantized checkpoint)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete, inconsistent, or not one the engines can serve."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: Any) -> str | None:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; None for None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def refuse_unservable(config, where: str) -> None:
    """Raise CheckpointError, with the reason, for a config the engines cannot run."""
    model_type = getattr(config, "model_type", None)
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{where} has model_type {model_type!r}; this server runs {MODEL_TYPE!r} "
                              f"({', '.join(ARCHITECTURES)})")
    unknown = [a for a in (getattr(config, "architectures", None) or []) if a not in ARCHITECTURES]
    if unknown:
        raise CheckpointError(f"{where} names architecture(s) {unknown}; this server runs {list(ARCHITECTURES)}")
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise CheckpointError(f"{where} has a quantization_config (quant_method {method!r}): the engines serve "
                              f"unquantized float32/float16/bfloat16 weights; use the unquantized checkpoint")
    text = config.text_config
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: text_config rope type {rope.get('rope_type')!r} is not supported "
                              "(the M-RoPE tables are computed for the default rope)")
    if text.hidden_act != "silu":
        raise CheckpointError(f"{where}: text_config.hidden_act {text.hidden_act!r} is not supported (silu)")


def how_to_make(path: str | Path) -> str:
    """One line on making a test checkpoint at `path` (the profile its name gives, else `small`)."""
    from qwen3vl_triton.model.tiny import PROFILES

    path = Path(path)
    profile = path.name if path.name in PROFILES else "small"
    return (f"make one with `make checkpoint PROFILE={profile}` (writes checkpoints/{profile}) or "
            f"`qwen3vl-build-checkpoint --profile {profile} --out {path}`")


def read_config(path: str | Path):
    """`config.json` as transformers reads it (a `Qwen3VLMoeConfig`), refused with the reason when
    the engines cannot run it."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist; {how_to_make(path)}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}/config.json is missing")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # unknown model_type, malformed JSON, a value the config class rejects
        raise CheckpointError(f"{path}/config.json cannot be read by transformers {_transformers_version()}: "
                              f"{type(exc).__name__}: {exc}") from None
    refuse_unservable(config, f"{path}/config.json")
    return config


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F32, BF16, F16, I8, F8_E4M3, ...


class Tensors:
    """The checkpoint's safetensors, indexed from their headers: which file holds each tensor, its
    shape and dtype. `model.safetensors.index.json` names the shards when present (a sharded
    `save_pretrained`); otherwise every `*.safetensors` file of the directory is one. No weight is
    read until `get` asks for it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing")
        else:
            weight_map = None
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.path}")
        self.info: dict[str, TensorInfo] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():
                        if weight_map is not None and weight_map.get(name) != f.name:
                            continue  # the index assigns this name to another shard
                        view = handle.get_slice(name)
                        self.info[name] = TensorInfo(f, tuple(view.get_shape()), view.get_dtype())
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from None
        if weight_map is not None:
            lost = sorted(n for n in weight_map if n not in self.info)
            if lost:
                raise CheckpointError(f"{index} lists {len(lost)} tensor(s) its shards do not hold, e.g. {lost[0]} "
                                      f"in {weight_map[lost[0]]}")
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.info if n.startswith(prefix))

    def get(self, name: str) -> torch.Tensor:
        info = self.info.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is missing from {self.path}")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor of the tensor's shape and dtype (no data)."""
        info = self.info.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is missing from {self.path}")
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name} is {info.dtype}; only unquantized F32/F16/BF16 weights are served")
        return torch.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype], device="meta")

    def dtypes(self) -> dict[str, int]:
        """Parameters per stored dtype."""
        out: dict[str, int] = {}
        for info in self.info.values():
            out[info.dtype] = out.get(info.dtype, 0) + math.prod(info.shape)
        return out


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
    # transformers' reading of config.json (a Qwen3VLMoeConfig), for what needs the whole config
    config: Any = field(repr=False, compare=False)
    # video: the placeholder token and the video processor's bounds (video_preprocessor_config.json):
    # pixels of all frames kept together, frames sampled per second, and the frames kept
    video_token_id: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_fps: float | None = None
    video_min_frames: int | None = None
    video_max_frames: int | None = None

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @property
    def merge_factor(self) -> int:
        """Image side length, in pixels, covered by one merged image token."""
        return self.patch_size * self.spatial_merge_size

    def is_moe_layer(self, layer: int) -> bool:
        """transformers' rule (Qwen3VLMoeTextDecoderLayer): MoE unless listed in mlp_only_layers,
        on every decoder_sparse_step-th layer."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def serving_dtype(self, setting: str) -> str:
        """The serving dtype a `dtype` setting names: `auto` is the checkpoint's own dtype."""
        dtype = self.dtype if setting == "auto" else setting
        if dtype not in SERVING_DTYPES:
            raise ValueError(f"dtype {setting!r} is not auto, {', '.join(SERVING_DTYPES)}"
                             + (f" (the checkpoint's dtype is {self.dtype})" if setting == "auto" else ""))
        return dtype

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        config = read_config(path)
        dtype = dtype_name(config.dtype or config.text_config.dtype)
        if dtype is None:  # the config does not say: the embedding's stored dtype does
            tensors = Tensors(path)
            name = "model.language_model.embed_tokens.weight"
            dtype = dtype_name(SAFETENSORS_DTYPES.get(tensors.info[name].dtype)) if name in tensors else None
        return cls.from_config(config, path, dtype=dtype, **_token_facts(path, config))

    @classmethod
    def from_config(cls, config, path: str | Path | None = None, *, dtype: str | None = None,
                    end_id: int | None = None, end_ids: tuple[int, ...] = (), pad_id: int | None = None,
                    min_pixels: int | None = None, max_pixels: int | None = None, **video) -> "ModelSpec":
        """The spec of a transformers `Qwen3VLMoeConfig` and the token facts read beside it. Built
        from a config alone (a known configuration, no tokenizer or processor files), the token
        and pixel facts are None and `path` is empty: enough to check shapes, not to serve."""
        where = f"{path}/config.json" if path is not None else "config"
        refuse_unservable(config, where)
        text, vision = config.text_config, config.vision_config
        rope = text.rope_parameters or {}
        head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
        section = tuple(rope.get("mrope_section") or ())
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise CheckpointError(f"{where}: text_config rope mrope_section {list(section)} must have 3 entries "
                                  f"summing to head_dim/2 = {head_dim // 2}")
        if "rope_theta" not in rope:
            raise CheckpointError(f"{where}: text_config has no rope_theta")
        for name in ("patch_size", "temporal_patch_size"):
            if not isinstance(getattr(vision, name), int):
                raise CheckpointError(f"{where}: vision_config.{name} {getattr(vision, name)!r} must be one integer")
        return cls(
            path=Path(path) if path is not None else Path(""),
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim,
            num_experts=text.num_experts or 0,
            experts_per_token=text.num_experts_per_tok or 0,
            moe_intermediate_size=text.moe_intermediate_size or 0,
            intermediate_size=text.intermediate_size,
            mlp_only_layers=tuple(text.mlp_only_layers or ()),
            decoder_sparse_step=text.decoder_sparse_step or 1,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]),
            mrope_section=section,  # type: ignore[arg-type]
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            max_position_embeddings=text.max_position_embeddings,
            # the whole model's flag: transformers ties lm_head to the embedding by it (the text
            # sub-config carries its own default, which the conditional-generation model ignores)
            tie_word_embeddings=bool(config.tie_word_embeddings),
            dtype=dtype or "bfloat16",
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            vision_out_hidden_size=vision.out_hidden_size,
            deepstack_levels=len(vision.deepstack_visual_indexes or ()),
            image_token_id=config.image_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            end_id=end_id,
            end_ids=end_ids,
            pad_id=pad_id,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            config=config,
            video_token_id=getattr(config, "video_token_id", None),
            **video,
        )


def _token_facts(path: Path, config) -> dict:
    """End ids, pad id and the image processor's pixel bounds, read through transformers."""
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded (tokenizer.json, tokenizer_config.json): "
                              f"{type(exc).__name__}: {exc}") from None
    end_id = tokenizer.eos_token_id
    if end_id is None:
        raise CheckpointError(f"{path}/tokenizer_config.json has no eos_token (the chat template's end of turn)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    gen_eos: list[int] = []
    if (path / "generation_config.json").is_file():
        try:
            eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
        except Exception as exc:
            raise CheckpointError(f"{path}/generation_config.json cannot be read: {exc}") from None
        gen_eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end_ids = tuple(dict.fromkeys([end_id, *(int(i) for i in gen_eos)]))
    vocab = config.text_config.vocab_size
    for i in end_ids:
        if not 0 <= i < vocab:
            raise CheckpointError(f"{path}: end id {i} is outside the vocabulary (text_config.vocab_size {vocab})")
    try:
        processor = AutoImageProcessor.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: the image processor cannot be loaded (preprocessor_config.json): "
                              f"{type(exc).__name__}: {exc}") from None
    size = processor.size
    min_pixels = getattr(size, "shortest_edge", None) or getattr(processor, "min_pixels", None)
    max_pixels = getattr(size, "longest_edge", None) or getattr(processor, "max_pixels", None)
    if not min_pixels or not max_pixels:
        raise CheckpointError(f"{path}/preprocessor_config.json gives no min/max pixel bounds "
                              "(size.shortest_edge / size.longest_edge)")
    _check_patching(path, config, processor, "preprocessor_config.json")
    return dict(end_id=int(end_id), end_ids=end_ids, pad_id=int(pad_id), min_pixels=int(min_pixels),
                max_pixels=int(max_pixels), **_video_facts(path, config))


def _check_patching(path: Path, config, processor, filename: str) -> None:
    """The processor's patch, temporal patch and merge sizes equal the vision config's."""
    vision = config.vision_config
    for name, ours in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                       ("merge_size", vision.spatial_merge_size)):
        theirs = getattr(processor, name, ours)
        if theirs != ours:
            key = "spatial_merge_size" if name == "merge_size" else name
            raise CheckpointError(f"{path}: {filename} {name} {theirs} disagrees with "
                                  f"config.json vision_config.{key} {ours}")


def _video_facts(path: Path, config) -> dict:
    """The video processor's bounds, read by transformers' Qwen3-VL video processor (which falls back
    to preprocessor_config.json when the checkpoint has no video_preprocessor_config.json)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    try:
        processor = Qwen3VLVideoProcessor.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: the video processor cannot be loaded (video_preprocessor_config.json): "
                              f"{type(exc).__name__}: {exc}") from None
    _check_patching(path, config, processor, "video_preprocessor_config.json")
    size = processor.size
    if not size.shortest_edge or not size.longest_edge:
        raise CheckpointError(f"{path}/video_preprocessor_config.json gives no min/max pixel bounds "
                              "(size.shortest_edge / size.longest_edge)")
    return dict(video_min_pixels=int(size.shortest_edge), video_max_pixels=int(size.longest_edge),
                video_fps=float(processor.fps), video_min_frames=int(processor.min_frames),
                video_max_frames=int(processor.max_frames))


def experts_out_in(tensor: torch.Tensor, out_features: int, in_features: int, name: str) -> torch.Tensor:
    """A fused expert tensor as `[E, out, in]` (F.linear's layout).

    The hub's checkpoints store `[E, in, out]`; transformers 5 holds and `save_pretrained` writes
    `[E, out, in]`. Same rule as transformers' loader (`Transpose(check_dims=True)`): a tensor
    already of the `[E, out, in]` shape is taken as it is, one of the transposed shape is
    transposed, anything else is an error naming the tensor."""
    if tuple(tensor.shape[1:]) == (out_features, in_features):
        return tensor
    if tuple(tensor.shape[1:]) == (in_features, out_features):
        return tensor.transpose(1, 2)
    raise CheckpointError(f"{name} has shape {list(tensor.shape)}; expected [E, {out_features}, {in_features}] "
                          f"or the hub's [E, {in_features}, {out_features}]")


def iter_tensors(path: str | Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name without `prefix`, tensor) for every tensor whose name starts with `prefix`,
    across all safetensors shards of the checkpoint."""
    tensors = Tensors(path)
    for name in tensors.names(prefix):
        yield name[len(prefix):], tensors.get(name)


def load_state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    state = dict(iter_tensors(path, prefix))
    if not state:
        raise CheckpointError(f"no tensors named {prefix}* in {path}")
    return state
