"""Render `model_repository/` templates into a servable Triton model repository.

Each model folder holds `config.pbtxt` (or `config.<device>.pbtxt`, which wins on that device)
with `${name}` placeholders and a `1/` folder copied as is. Values come from the checkpoint
(sizes, dtypes), the device and the serving settings. Rendering is strict: a placeholder
without a value, an inconsistent setting, a config that does not parse as a Triton
`ModelConfig`, or one that declares a tensor twice is an error here, not a model that fails to
load later.

No configuration names a host path (every client may read them: serve/admin.py). A model folder
that needs the checkpoint, the Python environment or the TensorRT-LLM engine gets a link to it
(`checkpoint`, `python_env`, `engine`) and its configuration names the link: the models resolve
`checkpoint` against their own folder (backend.tensors.model_params), the Python backend expands
`$$TRITON_MODEL_DIRECTORY` in EXECUTION_ENV_PATH, and the tensorrtllm backend opens
`gpt_model_path` as given, relative to the server's working directory, the repository
(server.TritonServer runs tritonserver there). Triton takes only numeric sub-folders of a model
folder as versions, so the links are no models and no versions.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qwen3vl_triton.arrays import config_type
from qwen3vl_triton.model.checkpoint import ModelSpec

TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"

TOPOLOGIES = {
    # one server with every model: the qwen3vl ensemble and both disaggregated entry points
    "all": ("qwen3vl", "preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing", "encode", "language"),
    "single": ("qwen3vl", "preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing"),
    "encoder": ("encode", "preprocessing", "vision_encoder", "qwen3vl_disagg"),
    "language": ("language", "tensorrt_llm", "postprocessing"),
}

# the links a rendered model folder holds, and what they point at
CHECKPOINT_LINK = "checkpoint"  # the Hugging Face checkpoint
ENV_LINK = "python_env"  # the virtual environment the Python backend's stub runs in
ENGINE_LINK = "engine"  # the TensorRT-LLM engine (GPU tensorrt_llm)
GGUF_LINK = "weights.gguf"  # the ggml runner's weights, converted before the server starts (CPU tensorrt_llm)

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RenderError(ValueError):
    pass


@dataclass
class Settings:
    """Serving settings; every field can be set from the launcher's command line."""

    max_batch_size: int = 16  # Triton max_batch_size of the models (requests per batch)
    engine_max_batch: int = 16  # sequences the LLM engine runs at once (in-flight)
    engine_max_queue: int = 128  # requests waiting for a place in the engine's batch; more get UNAVAILABLE
    max_seq_len: int = 4096  # prompt + generated tokens per sequence
    max_output_len: int = 1024  # largest max_tokens accepted
    max_num_tokens: int = 1024  # prompt tokens prefilled per engine step (longer prompts are chunked)
    max_images: int = 8  # images per request
    max_image_pixels: int = 4096 * 4096  # larger encoded images are refused before decoding
    # byte bounds, checked before any parsing, templating or decoding: all text of a request
    # (0: 16 bytes per token of max_seq_len), each encoded image, and the whole request
    max_text_bytes: int = 0
    max_image_bytes: int = 20 * 2**20
    max_request_bytes: int = 64 * 2**20
    # videos per request, and each one's bounds, checked before its frames are decoded: the encoded
    # file's bytes, the frames and seconds its container declares, width x height of a frame, and the
    # pixels of the frames kept (sampled), all together
    max_videos: int = 2
    max_video_bytes: int = 32 * 2**20
    max_video_frames: int = 18_000
    max_video_seconds: int = 600
    max_video_frame_pixels: int = 3840 * 2160
    max_video_pixels: int = 2**28
    # the vision encoder's cache of recent images' rows (embeddings + DeepStack), in bytes; 0: off
    vision_cache_bytes: int = 256 * 2**20
    # preprocessing's cache of recent images' pixel values (decoded, resized, normalized), by the
    # SHA-256 of the image as sent, in bytes per preprocessing instance; 0: off. A conversation
    # sends its images again every turn: they are decoded once.
    pixel_cache_bytes: int = 64 * 2**20
    # the CPU engine's prefix cache: finished sequences' KV kept for requests that start with the
    # same tokens and images (a conversation's next turn), in bytes; 0: off. The ggml runner
    # allocates it at start as whole llama.cpp sequences of max_seq_len cells.
    kv_cache_bytes: int = 256 * 2**20
    # OpenAI endpoint: hosts whose http(s) image URLs it fetches (comma-separated; empty: none),
    # with a size and time limit per image
    image_url_hosts: str = ""
    image_url_max_bytes: int = 20 * 2**20
    image_url_timeout_ms: int = 5000
    # OpenAI endpoint, for slow clients: time for a request's line and headers to arrive, and for its
    # body (from the end of its headers), else 408 and the connection is closed; connections open at
    # once, past it 503. Each body is bounded by max_request_bytes, refused (413) before it is read,
    # and the bodies of all requests in flight by openai_body_budget_bytes (past it 503, before reading).
    openai_header_timeout_ms: int = 10_000
    openai_body_timeout_ms: int = 60_000
    openai_max_connections: int = 512
    openai_body_budget_bytes: int = 256 * 2**20
    # the serving dtype of the whole model (vision tower, tables, LLM): float32, bfloat16, float16,
    # or auto (the checkpoint's own); float32 serves any checkpoint upcast. q8_0 and q4_k (Q4_K_M):
    # the LLM's weights quantized by llama.cpp (the ggml runner only), vision tower and tables float32
    dtype: str = "float32"
    # the CPU engine's runner: ggml (llama.cpp's kernels; weights converted at the first start into
    # <build-dir>/ggml), torch (the exact reference), or auto: ggml wherever llama.cpp's model covers
    # the checkpoint, else torch with the reason (serve/cpu_engine.py)
    cpu_runner: str = "auto"
    # threads of the CPU engine's steps while sequences decode, and of a lone prompt's prefill (no
    # sequence decoding beside it); 0: the measured defaults (serve/cpu_engine.engine_threads)
    decode_threads: int = 0
    prefill_threads: int = 0
    # how long the vision encoder's dynamic batcher holds a request for others to join. 0: on a
    # CPU a wait buys no compute (a batch of images costs what its images cost one by one), and
    # requests that queue while the encoder is busy are still batched.
    vision_queue_delay_us: int = 0
    preprocessing_instances: int = 1
    stream_idle_seconds: int = 300  # postprocessing drops a stream state idle this long
    # requests waiting in the queue of each batched model (preprocessing, vision_encoder,
    # postprocessing; tensorrt_llm on GPU); past it a request is refused at once with UNAVAILABLE
    max_queue_size: int = 64
    # as the tensorrtllm backend's parameters: how soon a cancelled request stops, and how often
    # the engine's metrics are sent (each check or update is a round trip to the server)
    cancellation_check_period_ms: int = 100
    stats_check_period_ms: int = 100
    # disaggregated language server
    language_state_bytes: int = 2 * 2**30  # bound on the tables held by `language` sequences
    sequence_idle_us: int = 60_000_000  # sequence batcher max_sequence_idle_microseconds
    language_max_sequences: int = 256  # open `language` sequences; a start past it is refused (UNAVAILABLE)
    # rows of recently received images kept by a language server, by their prompt_table_extra_ids: a
    # conversation's next turn sends none of its earlier images' rows; in bytes, 0: off
    language_row_cache_bytes: int = 512 * 2**20
    # language server: on SIGTERM it takes no new sequence and lets the open ones finish for up to
    # this many seconds (an orchestrator moves those still running when it stops), then stops
    drain_timeout_s: int = 30
    # encoder server: the language servers qwen3vl_disagg sends tables to (gRPC): HOST:PORT[,HOST:PORT...]
    # or dns:NAME:PORT (NAME's A records, resolved again every few seconds); empty: no qwen3vl_disagg.
    # language_url: one HOST:PORT, the same as a one-server language_urls
    language_urls: str = ""
    language_url: str = ""
    chunk_rows: int = 256  # table rows per chunk sent by qwen3vl_disagg
    # times qwen3vl_disagg moves one sequence whose language server failed, then the request fails
    migration_limit: int = 3

    @property
    def language_servers(self) -> str:
        """Where qwen3vl_disagg sends tables: language_urls, else language_url (empty: nowhere)."""
        return self.language_urls or self.language_url

    @property
    def text_bytes(self) -> int:
        """The bound on all text of a request that max_text_bytes sets (0: 16 bytes per token)."""
        return self.max_text_bytes or 16 * self.max_seq_len

    def check(self, spec: ModelSpec, device: str) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                problems.append(f"{f.name} must be >= 0, got {value}")
        for name in (
            "max_batch_size",
            "engine_max_batch",
            "engine_max_queue",
            "max_output_len",
            "max_num_tokens",
            "max_images",
            "preprocessing_instances",
            "language_max_sequences",
            "chunk_rows",
            "max_queue_size",
            "cancellation_check_period_ms",
            "stats_check_period_ms",
            "max_image_bytes",
            "max_request_bytes",
            "max_video_bytes",
            "max_video_frames",
            "max_video_seconds",
            "max_video_frame_pixels",
            "max_video_pixels",
            "image_url_max_bytes",
            "image_url_timeout_ms",
            "openai_header_timeout_ms",
            "openai_body_timeout_ms",
            "openai_max_connections",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.language_urls and self.language_url:
            problems.append("set language_urls or language_url, not both (language_url is a one-server language_urls)")
        for name in ("language_urls", "language_url"):
            if getattr(self, name):
                from qwen3vl_triton.transfer.pool import parse_urls

                try:
                    urls, dns = parse_urls(getattr(self, name), name)
                except ValueError as exc:
                    problems.append(str(exc))
                else:
                    if name == "language_url" and (dns or len(urls) != 1):
                        problems.append(f"language_url: one HOST:PORT (several go in language_urls), "
                                        f"got {self.language_url!r}")
        if self.max_seq_len > spec.max_position_embeddings:
            problems.append(f"max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                            f"{spec.max_position_embeddings}")
        if self.openai_body_budget_bytes < self.max_request_bytes:
            problems.append(f"openai_body_budget_bytes {self.openai_body_budget_bytes} is below max_request_bytes "
                            f"{self.max_request_bytes}: no request of the largest size could be read")
        if self.max_output_len >= self.max_seq_len:
            problems.append(f"max_output_len {self.max_output_len} leaves no room for a prompt in "
                            f"max_seq_len {self.max_seq_len}")
        from qwen3vl_triton.serve.cpu_engine import QUANTIZED, choose

        try:
            dtype = "float32" if self.dtype in QUANTIZED else spec.serving_dtype(self.dtype)
        except ValueError as exc:
            problems.append(f"{exc}, {' or '.join(QUANTIZED)}")
        else:
            try:
                choose(spec, self, device)
            except RenderError as exc:
                problems.append(str(exc))
            if device == "cpu" and dtype == "float16":
                named = f"dtype {self.dtype}" + (f" (the checkpoint's {dtype})" if self.dtype == "auto" else "")
                problems.append(f"{named}: the CPU engine serves float32 or bfloat16 (CPUs have no fast float16 "
                                "matmul); dtype=float32 serves any checkpoint upcast")
        if problems:
            raise RenderError("inconsistent settings: " + "; ".join(problems))


def _python_env() -> Path | None:
    """The virtual environment this interpreter runs in; None for a system Python (e.g. the Triton
    image's), where the stub finds the packages itself."""
    return None if sys.prefix == sys.base_prefix else Path(sys.prefix)


def _python_env_block() -> str:
    """The EXECUTION_ENV_PATH parameter when serving from a virtual environment: the model folder's
    link to it (the Python backend replaces a leading $$TRITON_MODEL_DIRECTORY by the folder)."""
    if _python_env() is None:
        return ""
    return ('parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "$$TRITON_MODEL_DIRECTORY/%s" } }'
            % ENV_LINK)


def engine_values(spec: ModelSpec, settings: Settings, engine_dir: str | Path) -> dict[str, str]:
    """GPU: what the built TensorRT-LLM engine fixes (batch, dtype, table stride, M-RoPE rows)."""
    from qwen3vl_triton.trtllm.build import EngineFacts

    engine_dir = Path(engine_dir).resolve()
    if not (engine_dir / "config.json").is_file():
        raise RenderError(
            f"engine directory {engine_dir} has no config.json: build it with builders/trtllm/build_engine.py"
        )
    facts = EngineFacts.load(engine_dir)
    problems = [f"{name}: engine {got}, checkpoint {want}" for name, got, want in (
        ("hidden_size", facts.hidden_size, spec.hidden_size), ("vocab_size", facts.vocab_size, spec.vocab_size),
        ("deepstack_levels", facts.deepstack_levels, spec.deepstack_levels)) if got != want]
    if problems:
        raise RenderError(f"engine {engine_dir} was not built from this checkpoint: {'; '.join(problems)}")
    if settings.max_seq_len > facts.mrope_positions:
        raise RenderError(f"max_seq_len {settings.max_seq_len} exceeds the engine's {facts.mrope_positions} positions")
    # gpt_model_path: the link in the rendered tensorrt_llm folder, relative to the repository
    vals = facts.config_values(f"tensorrt_llm/{ENGINE_LINK}",
                               cancellation_check_period_ms=settings.cancellation_check_period_ms,
                               stats_check_period_ms=settings.stats_check_period_ms,
                               max_queue_size=settings.max_queue_size)
    vals.update(dtype=facts.dtype, table_stride=str(facts.table_stride),
                mrope_positions=str(facts.mrope_positions))
    return vals


def values(spec: ModelSpec, device: str, settings: Settings, extra: dict | None = None) -> dict[str, str]:
    from qwen3vl_triton.serve.cpu_engine import choose

    engine = choose(spec, settings, device)
    dtype = engine.float_dtype  # the vision tower's and the tables'
    table_dtype = config_type(dtype)
    v = {k: str(x) for k, x in asdict(settings).items()}
    v.update(
        dtype=dtype,
        checkpoint=CHECKPOINT_LINK,  # the link in each model folder that needs it
        device="cuda" if device == "gpu" else "cpu",
        instance_kind="KIND_GPU" if device == "gpu" else "KIND_CPU",
        hidden_size=str(spec.hidden_size),
        patch_dim=str(3 * spec.temporal_patch_size * spec.patch_size ** 2),
        table_dtype=table_dtype,
        max_input_len=str(settings.max_seq_len - 1),
        max_text_bytes=str(settings.text_bytes),
        # postprocessing holds a worker per running generation: room for a full engine batch and
        # as many waiting for a place
        generate_workers=str(2 * settings.engine_max_batch),
        # Triton's sequence slots for `language`: room beyond the model's own bound, so a start past
        # it reaches the model and is refused at once (see model_repository/language/config.pbtxt)
        language_sequence_slots=str(2 * settings.language_max_sequences),
        # CPU: each table and rotary table sized to its request (GPU: engine_values fixes both)
        mrope_positions="0",
        table_stride="0",
        python_env=_python_env_block(),
        # the CPU LLM: its runner (auto resolved), its weights' dtype, the GGUF file when converted
        # before the server starts (serve/cpu_engine.prepare; empty: the model converts at load)
        language_servers=settings.language_servers,
        cpu_runner=engine.runner,
        llm_dtype=engine.dtype,
        gguf="",
    )
    v.update({k: str(x) for k, x in (extra or {}).items()})
    return v


def _link_paths(folder: Path, config, checkpoint: Path, engine_dir: str | Path | None,
                gguf: str | Path | None = None) -> None:
    """The links the configuration of the model in `folder` names instead of host paths."""
    params = config.parameters
    if gguf and "gguf" in params:
        (folder / GGUF_LINK).symlink_to(Path(gguf).resolve())
    links = {}
    if "checkpoint" in params:
        links[CHECKPOINT_LINK] = checkpoint
    if "EXECUTION_ENV_PATH" in params:
        links[ENV_LINK] = _python_env()
    if "gpt_model_path" in params:
        links[ENGINE_LINK] = engine_dir
    for name, target in links.items():
        (folder / name).symlink_to(Path(target).resolve(), target_is_directory=True)


def fill(template: str, vals: dict[str, str], where: str) -> str:
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in vals})
    if missing:
        raise RenderError(f"{where}: no value for placeholder(s) {', '.join(missing)}")
    out = _PLACEHOLDER.sub(lambda m: vals[m.group(1)], template)
    if "${" in out:
        raise RenderError(f"{where}: malformed placeholder left after rendering")
    return out


def parse_config(text: str, where: str):
    """Parse as Triton's ModelConfig protobuf (the schema tritonserver reads)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RenderError(f"{where}: not a valid Triton model config: {exc}") from None


def render(checkpoint: str | Path, out: str | Path, device: str = "cpu", topology: str = "all",
           settings: Settings | None = None, extra: dict | None = None, templates: Path = TEMPLATES,
           engine_dir: str | Path | None = None) -> Path:
    """Write the repository for `topology` to `out` (replaced) and return it.

    device "gpu" serves `tensorrt_llm` with the tensorrtllm backend and needs the built engine."""
    if device not in ("cpu", "gpu"):
        raise RenderError(f"device must be cpu or gpu, got {device!r}")
    if topology not in TOPOLOGIES:
        raise RenderError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    spec = ModelSpec.load(checkpoint)
    settings = settings or Settings()
    settings.check(spec, device)
    engine = {}
    if device == "gpu":
        if engine_dir is None:
            raise RenderError("device gpu needs engine_dir, the TensorRT-LLM engine built for this checkpoint")
        engine = engine_values(spec, settings, engine_dir)
    vals = values(spec, device, settings, {**engine, **(extra or {})})
    gguf = vals.get("gguf") or None
    if gguf:
        vals["gguf"] = GGUF_LINK  # the link in the model's folder, not the host path
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for model in TOPOLOGIES[topology]:
        if model == "qwen3vl_disagg" and not settings.language_servers:
            continue  # it needs a language server to send to
        src = templates / model
        if not src.is_dir():
            raise RenderError(f"model template {src} is missing")
        template = src / f"config.{device}.pbtxt"
        if not template.is_file():
            template = src / "config.pbtxt"
        text = fill(template.read_text(encoding="utf-8"), vals, str(template))
        config = parse_config(text, str(template))
        if config.name != model:
            raise RenderError(f"{template}: name {config.name!r} does not match its folder {model!r}")
        for kind, tensors in (("input", config.input), ("output", config.output)):
            names = [t.name for t in tensors]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise RenderError(f"{template}: {kind}(s) {', '.join(twice)} declared more than once")
        (out / model).mkdir()
        (out / model / "config.pbtxt").write_text(text, encoding="utf-8")
        _link_paths(out / model, config, spec.path, engine_dir, gguf)
        for version in (p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
            shutil.copytree(version, out / model / version.name, ignore=shutil.ignore_patterns("__pycache__"))
        # Triton loads a model only with a version folder; an ensemble's stays empty (git keeps none)
        (out / model / "1").mkdir(exist_ok=True)
    return out
