"""Building the TensorRT-LLM engine, and the facts about it that serving needs.

The engine is TensorRT-LLM 1.2's `QWenForCausalLM` (qwen3_moe) with the DeepStack add in the
decoder loop (`model.py`). What depends on this build and nothing else:

- every request's prompt table is packed with the engine's stride S (`max_image_tokens`):
  `table.pack_table(E, D, stride=S)`, `prompt_vocab_size` = (levels + 1) S;
- `max_prompt_embedding_table_size` = max_batch_size * (levels + 1) * S, so that TensorRT-LLM's
  prompt_vocab_size (= max_prompt_embedding_table_size / max_batch_size) is exactly one table;
- `mrope_rotary_cos_sin` has max_position_embeddings rows (the checkpoint's value).

`build_engine` imports TensorRT-LLM; everything else here is plain Python.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from qwen3vl_triton.trtllm.deepstack import IMPLEMENTATIONS, PLUGIN_LIBRARY


@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = 8
    max_image_tokens: int = 1024  # S: image tokens of one request (all its images), the table stride
    max_input_len: int = 4096
    max_seq_len: int = 8192
    max_num_tokens: int = 8192
    deepstack_impl: str = "plugin"  # or "stock": the same add from TensorRT-LLM's own ops
    gather_context_logits: bool = False  # tests compare prefill logits with it

    def validate(self, checkpoint_config: dict) -> None:
        if self.deepstack_impl not in IMPLEMENTATIONS:
            raise ValueError(f"deepstack_impl must be one of {IMPLEMENTATIONS}, got {self.deepstack_impl!r}")
        if min(self.max_batch_size, self.max_image_tokens, self.max_input_len, self.max_num_tokens) < 1:
            raise ValueError("sizes must be positive")
        if self.max_image_tokens > self.max_input_len:
            raise ValueError(f"max_image_tokens {self.max_image_tokens} exceeds max_input_len {self.max_input_len}")
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}")
        positions = checkpoint_config["max_position_embeddings"]
        if self.max_seq_len > positions:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the checkpoint's max_position_embeddings "
                             f"{positions}, the rows of mrope_rotary_cos_sin; convert with a larger value")
        if checkpoint_config.get("mapping", {}).get("pp_size", 1) != 1:
            raise ValueError("pipeline parallelism is not supported: the DeepStack layers need the prompt table")

    def prompt_vocab_size(self, levels: int) -> int:
        """Rows of one request's table, (levels + 1) S."""
        return (levels + 1) * self.max_image_tokens


def build_config_fields(settings: EngineSettings, checkpoint_config: dict) -> dict:
    """Keyword arguments of `tensorrt_llm.builder.BuildConfig` (`plugin_config` as a dict)."""
    settings.validate(checkpoint_config)
    dtype = checkpoint_config["dtype"]
    return {
        "max_batch_size": settings.max_batch_size,
        "max_beam_width": 1,
        "max_input_len": settings.max_input_len,
        "max_seq_len": settings.max_seq_len,
        "max_num_tokens": settings.max_num_tokens,
        "max_prompt_embedding_table_size":
            settings.max_batch_size * settings.prompt_vocab_size(checkpoint_config["deepstack_levels"]),
        "use_mrope": True,  # the C++ runtime then feeds mrope_rotary_cos_sin / mrope_position_deltas
        "gather_context_logits": settings.gather_context_logits,
        "plugin_config": {
            "gpt_attention_plugin": "auto",
            "gemm_plugin": "auto",
            "moe_plugin": "auto",
            "remove_input_padding": True,  # in-flight batching; the DeepStack add expects packed tokens
            "paged_kv_cache": True,
            "context_fmha": dtype != "float32",  # fused MHA has no fp32 kernels
            # KV cache reuse (enable_kv_cache_reuse) attends over cached blocks through paged context FMHA
            "use_paged_context_fmha": dtype != "float32",
        },
    }


def load_plugin_library(path: str | Path | None = None) -> Path:
    """Load the DeepstackAdd plugin library into this process (its creator registers itself).

    Default: $QWEN3VL_DEEPSTACK_PLUGIN, the CMake build directory, then the install prefix the
    launcher uses."""
    env = os.environ.get("QWEN3VL_DEEPSTACK_PLUGIN")
    candidates = [Path(path)] if path else [Path(env)] if env else [
        Path(__file__).resolve().parents[2] / "builders" / "plugin" / "build" / PLUGIN_LIBRARY,
        Path("/opt/qwen3vl/lib") / PLUGIN_LIBRARY,
    ]
    for candidate in candidates:
        if candidate.is_file():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return candidate
    raise FileNotFoundError(f"{PLUGIN_LIBRARY} not found at {', '.join(map(str, candidates))}; build it with "
                            "cmake -S builders/plugin -B builders/plugin/build && cmake --build builders/plugin/build")


def build_engine(checkpoint_dir: str | Path, output_dir: str | Path, settings: EngineSettings,
                 plugin_library: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Build the engine from a converted checkpoint (convert.convert_checkpoint) into `output_dir`."""
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models.qwen.config import QWenConfig
    from tensorrt_llm.plugin import PluginConfig

    from qwen3vl_triton.trtllm.model import Qwen3VLForCausalLM

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    checkpoint_config = json.loads((checkpoint_dir / "config.json").read_text())
    fields = build_config_fields(settings, checkpoint_config)
    t0 = time.time()
    if settings.deepstack_impl == "plugin":
        log(f"[build] DeepstackAdd plugin from {load_plugin_library(plugin_library)}")

    config = QWenConfig.from_json_file(str(checkpoint_dir / "config.json"))
    config.deepstack_impl = settings.deepstack_impl
    config.deepstack_stride = settings.max_image_tokens
    log(f"[build] loading {checkpoint_dir}")
    model = Qwen3VLForCausalLM.from_checkpoint(str(checkpoint_dir), config=config)

    plugin_config = PluginConfig()
    for key, value in fields.pop("plugin_config").items():
        setattr(plugin_config, key, value)
    build_config = BuildConfig(**fields, plugin_config=plugin_config)
    log(f"[build] building the engine ({asdict(settings)})")
    engine = build(model, build_config)
    engine.save(str(output_dir))
    log(f"[build] wrote {output_dir} in {time.time() - t0:.0f}s")
    return output_dir


@dataclass(frozen=True)
class EngineFacts:
    """What the serving side reads from a built engine's config.json."""

    max_batch_size: int
    dtype: str
    hidden_size: int
    vocab_size: int
    deepstack_levels: int
    table_stride: int  # S: pack every request's table with this stride
    prompt_vocab_size: int  # rows of every request's table, (levels + 1) S
    mrope_positions: int  # rows of mrope_rotary_cos_sin
    deepstack_impl: str
    kv_cache_reuse: bool = False  # built with paged context FMHA, which KV cache reuse needs

    @classmethod
    def load(cls, engine_dir: str | Path) -> "EngineFacts":
        config = json.loads((Path(engine_dir) / "config.json").read_text())
        pretrained, build_config = config["pretrained_config"], config["build_config"]
        levels = pretrained["deepstack_levels"]
        prompt_vocab_size = build_config["max_prompt_embedding_table_size"] // build_config["max_batch_size"]
        return cls(
            max_batch_size=build_config["max_batch_size"],
            dtype=pretrained["dtype"],
            hidden_size=pretrained["hidden_size"],
            vocab_size=pretrained["vocab_size"],
            deepstack_levels=levels,
            table_stride=prompt_vocab_size // (levels + 1),
            prompt_vocab_size=prompt_vocab_size,
            mrope_positions=pretrained["max_position_embeddings"],
            deepstack_impl=pretrained.get("deepstack_impl", "plugin"),
            kv_cache_reuse=bool(build_config.get("plugin_config", {}).get("use_paged_context_fmha", False)),
        )

    def config_values(self, engine_dir: str | Path, *, cancellation_check_period_ms: int, stats_check_period_ms: int,
                      max_queue_size: int, kv_cache_free_gpu_mem_fraction: float = 0.9) -> dict[str, str]:
        """Values for every placeholder of model_repository/tensorrt_llm/config.gpu.pbtxt; the two
        periods and the queue bound are the serving settings' (repository.Settings)."""
        from qwen3vl_triton.arrays import config_type  # the serving host's (numpy, tritonclient)

        return {
            "engine_dir": str(engine_dir),
            "max_batch_size": str(self.max_batch_size),
            "table_dtype": config_type(self.dtype),
            "hidden_size": str(self.hidden_size),
            "kv_cache_free_gpu_mem_fraction": str(kv_cache_free_gpu_mem_fraction),
            "cancellation_check_period_ms": str(cancellation_check_period_ms),
            "stats_check_period_ms": str(stats_check_period_ms),
            "max_queue_size": str(max_queue_size),
            "enable_kv_cache_reuse": "true" if self.kv_cache_reuse else "false",
        }
