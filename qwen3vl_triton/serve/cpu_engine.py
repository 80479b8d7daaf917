"""Which engine serves `tensorrt_llm` on a CPU, and its weights, decided before tritonserver starts.

`--set cpu_runner=auto|ggml|torch` and `--set dtype=float32|bfloat16|q8_0|q4_k`:

- `ggml`: the engine's step on llama.cpp's Qwen3-VL-MoE kernels (engine/ggml_runner.py). Its
  weights are the checkpoint's text model converted to GGUF by llama.cpp's own converter --
  `prepare` does it before the server starts, into `<build-dir>/ggml`, with progress on the
  console (as a GPU engine is built), and reuses the file while the checkpoint, the converter and
  the dtype are unchanged (engine/ggml_weights.py);
- `torch`: engine/runner.py over model/lm.py, the exact reference (float32 and bfloat16);
- `auto` (the default): ggml wherever llama.cpp's model covers the checkpoint, else torch, and
  the reason is printed (a dense layer among MoE layers, llama-cpp-python not installed, ...).

q8_0 and q4_k are the ggml runner's (llama.cpp quantizes); asked for with `cpu_runner=torch`, or
where the ggml runner cannot serve, they are refused with the reason, never served otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qwen3vl_triton.model.checkpoint import ModelSpec

QUANTIZED = ("q8_0", "q4_k")
RUNNERS = ("auto", "ggml", "torch")


@dataclass(frozen=True)
class EngineChoice:
    runner: str  # "ggml", "torch" (CPU) or "tensorrtllm" (GPU)
    dtype: str  # the LLM's weights: float32, bfloat16, float16, q8_0, q4_k
    float_dtype: str  # the vision tower's and the prompt tables'
    note: str | None = None  # why auto did not choose ggml
    gguf: Path | None = None  # the ggml runner's weights, once `prepare` converted them

    def describe(self) -> str:
        return f"{self.runner} ({self.dtype})"


def ggml_unavailable(spec: ModelSpec) -> str | None:
    """Why the ggml runner cannot serve `spec` here, or None."""
    from qwen3vl_triton.engine.ggml_runner import unsupported_reason

    reason = unsupported_reason(spec)
    if reason is None and importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python is not installed in this environment (`make venv` builds it)"
    return reason


def choose(spec: ModelSpec, settings, device: str = "cpu") -> EngineChoice:
    """The engine the settings ask for on `device`; RenderError (with the reason) when they ask
    for one that cannot serve this checkpoint."""
    from qwen3vl_triton.serve.repository import RenderError

    if settings.cpu_runner not in RUNNERS:
        raise RenderError(f"cpu_runner must be one of {', '.join(RUNNERS)}, got {settings.cpu_runner!r}")
    quantized = settings.dtype in QUANTIZED
    try:
        float_dtype = "float32" if quantized else spec.serving_dtype(settings.dtype)
    except ValueError as exc:
        raise RenderError(f"{exc}, {' or '.join(QUANTIZED)}") from None
    dtype = settings.dtype if quantized else float_dtype
    if device == "gpu":
        if quantized:
            raise RenderError(f"dtype {dtype}: quantized weights are the CPU engine's (ggml runner); the GPU "
                              f"engine's dtype is the TensorRT-LLM engine's")
        return EngineChoice("tensorrtllm", dtype, float_dtype)
    if settings.cpu_runner == "torch":
        if quantized:
            raise RenderError(f"dtype {dtype}: quantized weights are served by the ggml runner only (cpu_runner=ggml "
                              f"or auto); cpu_runner=torch serves float32 or bfloat16")
        return EngineChoice("torch", dtype, float_dtype)
    reason = ggml_unavailable(spec)
    if reason is None:
        return EngineChoice("ggml", dtype, float_dtype)
    if settings.cpu_runner == "ggml":
        raise RenderError(f"cpu_runner=ggml: {reason}")
    if quantized:
        raise RenderError(f"dtype {dtype} needs the ggml runner, which cannot serve here: {reason}")
    return EngineChoice("torch", dtype, float_dtype, note=f"cpu_runner=auto chose torch: {reason}")


def prepare(spec: ModelSpec, settings, device: str, build_dir: str | Path, log=print) -> EngineChoice:
    """`choose`, and for the ggml runner its weights converted (or found converted) under
    `<build_dir>/ggml`, with progress through `log`. The launcher calls it before the server
    starts and renders the repository with `values_of` the result."""
    from qwen3vl_triton.engine.ggml_weights import ensure_text_gguf

    choice = choose(spec, settings, device)
    if choice.note:
        log(f"[engine] {choice.note}")
    if choice.runner != "ggml":
        return choice
    gguf = ensure_text_gguf(spec.path, choice.dtype, Path(build_dir) / "ggml", log=log)
    return EngineChoice(choice.runner, choice.dtype, choice.float_dtype, choice.note, gguf)


def values_of(choice: EngineChoice) -> dict[str, str]:
    """Template values of a prepared choice (repository.render's `extra`)."""
    return {"cpu_runner": choice.runner if choice.runner != "tensorrtllm" else "torch",
            "gguf": str(choice.gguf) if choice.gguf else ""}


def engine_threads(runner: str, cores: int, prefill: int = 0, decode: int = 0) -> tuple[int, int]:
    """Threads of the engine's steps (prefill_threads, decode_threads settings; 0: the default):
    (a lone prompt's prefill, every other step).

    ggml runner: every core but one, for both -- the other core is the stubs' (vision encoder,
    preprocessing, postprocessing, Triton). ggml's threads meet at a spinning barrier after every
    op, so a thread that loses its core to a stub stalls the step: measured on 2 cores
    (load_tests/ggml_threads.py, docs/engine.md "Threads"), served decode on 2 threads gave 5x less
    throughput at concurrency 8 and a lone prefill on 2 threads a 4x longer time to first token
    than on 1. torch runner: every core for a lone prefill, DECODE_THREADS (1) otherwise, as measured
    for it (engine/runner.py)."""
    from qwen3vl_triton.engine.runner import DECODE_THREADS

    if runner == "ggml":
        spare = max(1, cores - 1)
        return prefill or spare, decode or spare
    return prefill or cores, decode or DECODE_THREADS


def render_prepared(checkpoint: str | Path, out: str | Path, build_dir: str | Path, settings=None, device: str = "cpu",
                    log=print, **render_kw) -> tuple[Path, EngineChoice]:
    """`repository.render` after `prepare`: the repository whose `tensorrt_llm` loads the weights
    converted here (the launcher's order; also for the demo, the tests and the bench)."""
    from qwen3vl_triton.serve.repository import Settings, render

    settings = settings or Settings()
    spec = ModelSpec.load(checkpoint)
    settings.check(spec, device)
    choice = prepare(spec, settings, device, build_dir, log=log)
    extra = {**values_of(choice), **(render_kw.pop("extra", None) or {})}
    return render(checkpoint, out, device=device, settings=settings, extra=extra, **render_kw), choice
