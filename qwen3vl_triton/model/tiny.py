"""Write a complete, deterministic Hugging Face Qwen3-VL-MoE checkpoint with random weights.

No weights can be downloaded here, so tests and benchmarks run on checkpoints written by this
module, in two layouts:

- `build_checkpoint` (layout "hub"): exactly the files and formats of the published hub
  checkpoints (`config.json` in the hub's layout -- `num_experts`, `rope_scaling` beside
  `rope_theta` --, safetensors with the hub's tensor names and `[E, in, out]` fused experts, a
  byte-level BPE `tokenizer.json` with the Qwen special tokens, the chat template in
  `tokenizer_config.json`, `preprocessor_config.json`, `video_preprocessor_config.json`,
  `generation_config.json`), written file
  by file. Same profile and seed -> the same bytes.
- `build_saved_checkpoint` (layout "transformers"): the same kind of model written by
  transformers' own `save_pretrained` -- model, tokenizer, image processor and generation
  config --, i.e. the layout of every checkpoint a user fine-tunes and saves with transformers
  (`num_local_experts`, `rope_parameters`, `[E, out, in]` experts, `chat_template.jinja`,
  sharded safetensors with an index), with options for the variations such checkpoints have.

    python -m qwen3vl_triton.model.tiny --profile tiny --out checkpoints/tiny
    python -m qwen3vl_triton.model.tiny --layout transformers --dtype bfloat16 --out checkpoints/tiny-saved
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# Profiles. `tiny` keeps the test suite fast; `small` is the benchmark model
# (hidden 512, 8 layers, 32 experts top-4, vision depth 8). Both are all-MoE, the layout of every
# published Qwen3-VL-MoE checkpoint and the one llama.cpp's model (the ggml runner) serves; layouts
# with dense layers (mlp_only_layers, decoder_sparse_step) are written by build_saved_checkpoint
# for the tests that cover them (tests/test_layouts.py, tests/test_trtllm_convert.py).
PROFILES: dict[str, dict] = {
    "tiny": {
        "text": dict(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, mrope_section=[4, 2, 2], num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=48, intermediate_size=128, mlp_only_layers=[],
            max_position_embeddings=4096,
        ),
        "vision": dict(
            hidden_size=32, num_heads=2, intermediate_size=64, depth=5,
            deepstack_visual_indexes=[1, 2, 3], num_position_embeddings=64,
        ),
        "pixels": (64 * 64, 256 * 256),
        # pixels of all frames a video keeps together (video_preprocessor_config.json size)
        "video_pixels": (64 * 64, 4 * 256 * 256),
    },
    "small": {
        "text": dict(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
            head_dim=64, mrope_section=[12, 10, 10], num_experts=32, num_experts_per_tok=4,
            moe_intermediate_size=192, intermediate_size=1024, mlp_only_layers=[],
            max_position_embeddings=8192,
        ),
        "vision": dict(
            hidden_size=256, num_heads=4, intermediate_size=1024, depth=8,
            deepstack_visual_indexes=[1, 3, 5], num_position_embeddings=2304,
        ),
        "pixels": (64 * 64, 1024 * 1024),
        "video_pixels": (64 * 64, 8 * 448 * 448),
    },
}

# Qwen's special tokens, in Qwen's order; they follow the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A Qwen-style chat template, as the published Qwen3-VL files render media: an image becomes
# <|vision_start|><|image_pad|><|vision_end|>, a video <|vision_start|><|video_pad|><|vision_end|> (whose
# <|video_pad|> the processor replaces by a `<t seconds>` and a block of pads per frame group).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the byte-level BPE is trained on: enough for merges of common English words.
_CORPUS = """\
Describe this image in short. What is in the picture? The photo shows a small red house next to a
tall green tree under a clear blue sky. A woman in a plaid shirt sits on a sandy beach at sunset,
smiling as she gives a high-five to a yellow dog. The ocean waves roll in the background. There are
two cats on the sofa, one black and one white, and a cup of coffee on the table. Count the circles
and squares in the image. The chart compares the sales of the first quarter with the second quarter.
A man is riding a bicycle down a narrow street in the old town while people walk past the shops.
Read the text on the sign: it says open every day from nine to five. The mountains are covered with
snow and the lake below reflects the light of the morning sun. Which of the two images is brighter?
Explain the difference between the left and the right picture, and list the colors you can see.
Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber gro\u00df \u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \U0001f600 \U0001f431 emoji and unicode text.
"""


def _train_tokenizer(vocab_target: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    lines = _CORPUS.splitlines()
    tok.train_from_iterator([line for _ in range(4) for line in lines], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _config(profile: dict, vocab_size: int, ids: dict[str, int], dtype: str) -> dict:
    t, v = profile["text"], profile["vision"]
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "model_type": "qwen3_vl_moe",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "dtype": dtype,
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "decoder_sparse_step": 1,
            "dtype": dtype,
            "head_dim": t["head_dim"],
            "hidden_act": "silu",
            "hidden_size": t["hidden_size"],
            "initializer_range": 0.02,
            "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": t["max_position_embeddings"],
            "mlp_only_layers": t["mlp_only_layers"],
            "moe_intermediate_size": t["moe_intermediate_size"],
            "norm_topk_prob": True,
            "num_attention_heads": t["num_attention_heads"],
            "num_experts": t["num_experts"],
            "num_experts_per_tok": t["num_experts_per_tok"],
            "num_hidden_layers": t["num_hidden_layers"],
            "num_key_value_heads": t["num_key_value_heads"],
            "rms_norm_eps": 1e-6,
            # the hub's layout: rope_theta beside rope_scaling
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": t["mrope_section"],
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe",
            "deepstack_visual_indexes": v["deepstack_visual_indexes"],
            "depth": v["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v["hidden_size"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": v["intermediate_size"],
            "num_heads": v["num_heads"],
            "num_position_embeddings": v["num_position_embeddings"],
            "out_hidden_size": t["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def _video_preprocessor(profile: dict) -> dict:
    """video_preprocessor_config.json as the published Qwen3-VL checkpoints write it (transformers'
    Qwen3VLVideoProcessor; fps 2, 4 to 768 frames: the class's defaults, which those files keep)."""
    min_px, max_px = profile["video_pixels"]
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": min_px, "longest_edge": max_px},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
    }


def _param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model, in the hub checkpoint's layout."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = Qwen3VLMoeConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(cfg)
    shapes = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        # transformers keeps fused experts as [E, out, in]; the hub stores [E, in, out]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            shape = (shape[0], shape[2], shape[1])
        shapes[name] = shape
    return shapes


_FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights that keep activations at unit scale and greedy decoding away from ties."""
    if name.endswith("bias"):
        return torch.randn(shape, generator=gen) * 0.02
    if len(shape) == 1:  # norms
        return 1.0 + torch.randn(shape, generator=gen) * 0.1
    if name.endswith(("embed_tokens.weight", "pos_embed.weight")):
        return torch.randn(shape, generator=gen) * 0.5
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        fan_in = shape[1]  # hub layout [E, in, out]
    else:
        fan_in = math.prod(shape[1:])
    scale = 4.0 if name == "lm_head.weight" else (2.0 if name.endswith("mlp.gate.weight") else 1.0)
    return torch.randn(shape, generator=gen) * (scale / math.sqrt(fan_in))


@contextlib.contextmanager
def _written_whole(out: Path, replace: bool = True):
    """A new folder beside `out` to write a checkpoint into: renamed to `out` (replacing an older
    one) when the block completes, removed when it fails, so no reader sees half a checkpoint.
    With `replace` False a checkpoint another process put at `out` meanwhile is kept and this one
    dropped (two servers started at once from one checkout both build the missing tiny checkpoint)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        yield tmp
        if out.exists() and replace:
            shutil.rmtree(out)
        try:
            tmp.rename(out)  # fails when `out` is there, not empty: renaming onto it is atomic
        except OSError:
            if replace or not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_checkpoint(out: str | Path, profile: str = "tiny", seed: int = 0, dtype: str = "float32",
                     log=print, replace: bool = True) -> Path:
    """Write the checkpoint directory `out` (replaced if present, unless `replace` is False) and
    return its path."""
    from safetensors.torch import save_file

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    prof = PROFILES[profile]
    from qwen3vl_triton.model.checkpoint import torch_dtype as dtype_of

    torch_dtype = dtype_of(dtype)
    out = Path(out)
    t0 = time.time()
    with _written_whole(out, replace) as tmp:
        log(f"[checkpoint] profile={profile} seed={seed} dtype={dtype} -> {out}")
        tok = _train_tokenizer(vocab_target=1000)
        tok.save(str(tmp / "tokenizer.json"))
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        vocab_size = -(-tok.get_vocab_size() // 128) * 128  # padded like the hub models' vocab
        log(f"[checkpoint] tokenizer: {tok.get_vocab_size()} tokens, embedding rows {vocab_size}")

        config = _config(prof, vocab_size, ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": False,
        }, indent=2, sort_keys=True) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": prof["text"]["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
            "errors": "replace",
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        }, indent=2, sort_keys=True) + "\n")
        min_px, max_px = prof["pixels"]
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "processor_class": "Qwen3VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "resample": 3,
            "size": {"shortest_edge": min_px, "longest_edge": max_px},
        }, indent=2, sort_keys=True) + "\n")
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(_video_preprocessor(prof), indent=2,
                                                                       sort_keys=True) + "\n")

        shapes = _param_shapes(config)
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        total = sum(math.prod(s) for s in shapes.values())
        done = 0
        for i, name in enumerate(sorted(shapes)):
            tensors[name] = _init(name, shapes[name], gen).to(torch_dtype).contiguous()
            done += math.prod(shapes[name])
            if i % 50 == 0 or i == len(shapes) - 1:
                log(f"[checkpoint] weights {done / total:6.1%} ({i + 1}/{len(shapes)} tensors)")
        # A stronger end-of-turn row: random models then end their turns after a few dozen
        # tokens, so both ways a generation stops (end token, max_tokens) occur in tests.
        tensors["lm_head.weight"][ids["<|im_end|>"]] *= 1.5
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"[checkpoint] wrote {total / 1e6:.1f}M parameters, {size / 2**20:.1f} MiB in {time.time() - t0:.1f}s")
    return out


def build_saved_checkpoint(out: str | Path, profile: str = "tiny", seed: int = 0, dtype: str = "float32", *,
                           tie_word_embeddings: bool = False, mlp_only_layers: list[int] | None = None,
                           decoder_sparse_step: int = 1, deepstack_visual_indexes: list[int] | None = None,
                           end_ids: list[str | int] | None = None, max_shard_size: str | None = None,
                           log=print) -> Path:
    """Write a checkpoint with transformers' `save_pretrained` (model, tokenizer, image processor,
    generation config) to `out` (replaced if present) and return its path.

    The weights are drawn as `build_checkpoint` draws them. `end_ids`: generation_config.json's
    eos_token_id list, as tokens or ids (default: the end of turn and `<|endoftext|>`);
    `max_shard_size` (e.g. "200KB") shards the safetensors behind an index."""
    from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    prof = copy.deepcopy(PROFILES[profile])
    if mlp_only_layers is not None:
        prof["text"]["mlp_only_layers"] = mlp_only_layers
    if deepstack_visual_indexes is not None:
        prof["vision"]["deepstack_visual_indexes"] = deepstack_visual_indexes
    out = Path(out)
    t0 = time.time()
    with _written_whole(out) as tmp:
        log(f"[checkpoint] save_pretrained layout, profile={profile} seed={seed} dtype={dtype} -> {out}")
        tok = _train_tokenizer(vocab_target=1000)
        tokenizer = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=CHAT_TEMPLATE,
                                   model_max_length=prof["text"]["max_position_embeddings"])
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        vocab_size = -(-tok.get_vocab_size() // 128) * 128
        hub = _config(prof, vocab_size, ids, dtype)
        hub["tie_word_embeddings"] = tie_word_embeddings
        hub["text_config"]["decoder_sparse_step"] = decoder_sparse_step
        config = Qwen3VLMoeConfig(**{k: v for k, v in hub.items() if k not in ("architectures", "model_type")})
        config.architectures = hub["architectures"]
        model = Qwen3VLMoeForConditionalGeneration(config).eval()
        shapes = _param_shapes(hub)
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name in sorted(shapes):
            t = _init(name, shapes[name], gen)
            # drawn in the hub's [E, in, out]; transformers holds (and saves) [E, out, in]
            state[name] = t.transpose(1, 2).contiguous() if name.endswith(_FUSED_EXPERTS) else t
        if tie_word_embeddings:  # lm_head is the embedding (whose rows build_checkpoint does not rescale)
            del state["lm_head.weight"]
        else:
            state["lm_head.weight"][ids["<|im_end|>"]] *= 1.5  # as build_checkpoint
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
        from qwen3vl_triton.model.checkpoint import torch_dtype

        model.to(torch_dtype(dtype))
        ends = [ids[e] if isinstance(e, str) else int(e) for e in (end_ids or ["<|im_end|>", "<|endoftext|>"])]
        model.generation_config = GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=ends,
                                                   pad_token_id=ids["<|endoftext|>"], do_sample=False)
        model.save_pretrained(str(tmp), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        tokenizer.save_pretrained(str(tmp))
        min_px, max_px = prof["pixels"]
        Qwen2VLImageProcessorPil(size={"shortest_edge": min_px, "longest_edge": max_px}, patch_size=16,
                                 temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                 image_std=[0.5, 0.5, 0.5]).save_pretrained(str(tmp))
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(_video_preprocessor(prof), indent=2,
                                                                       sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"[checkpoint] wrote {len(list(out.iterdir()))} files, {size / 2**20:.1f} MiB in {time.time() - t0:.1f}s")
    return out


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 over every file of a checkpoint directory (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_checkpoint(out: str | Path, profile: str = "tiny", seed: int = 0, log=print) -> Path:
    """Build the checkpoint unless a complete one is already there."""
    out = Path(out)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_checkpoint(out, profile=profile, seed=seed, log=log, replace=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--layout", choices=["hub", "transformers"], default="hub",
                    help="hub: the published checkpoints' files; transformers: written by save_pretrained")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (replaced if present)")
    args = ap.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    build = build_checkpoint if args.layout == "hub" else build_saved_checkpoint
    build(args.out, profile=args.profile, seed=args.seed, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
