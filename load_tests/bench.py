"""`make bench`: the served stack against transformers and llama.cpp, measured in the same run.

    python -m load_tests.bench            # full run
    python -m load_tests.bench --quick    # CI size: every row and every target figure, fewer requests

Rows (warm-up excluded, closed loop, 128 greedy output tokens per request):
- transformers: `Qwen3VLMoeForConditionalGeneration.generate` in process, sequential, fp32,
  greedy, image decode and preprocessing inside each request -- the baseline;
- qwen3vl: the single-server ensemble over gRPC streaming at concurrency 1, 4, 8, 16, on the
  default engine (cpu_runner=auto: the ggml runner, float32); qwen3vl-bf16 / qwen3vl-q8_0: the
  same served with `dtype=bfloat16` / `dtype=q8_0`, at concurrency 1 and 8;
- engine: the served engine's class in this process (same runner, weights and threads), in turn
  with the served c=1 row -- its batch-1 steps are the in-process side of serving_ms_per_token;
- llama.cpp-f32 / -bf16 / -q8_0: llama-server (`-np 8 -cb`) on GGUF files converted from the
  same checkpoint, through its OpenAI endpoint (bench_llamacpp.py), at concurrency 1 and 8, with
  the KV cells and attention the served engine keeps for the same weights (f32 cells and plain
  attention for f32, f16 with flash attention otherwise: bench_llamacpp.peer_kv);
- llama.cpp-f32-defaults: the same f32 files with llama-server's own KV defaults (f16 cells, flash
  attention), at concurrency 1 in turn with the others: not a target's row, what llama.cpp gives
  out of the box;
- disagg-shm / disagg-grpc: qwen3vl_triton.transfer.sender.Disaggregated (encode on the encoder server,
  table moved through system shared memory or gRPC payloads, generation on the language server)
  at concurrency 1 and 8.
At concurrency 1 the rows of a phase take turns request by request. Every request sends an image
no other request sent, and no side keeps a cache of images or prompts (the servers' encoder,
pixel, prefix KV and row caches are off, as llama.cpp's prompt cache is). Plus the micro-benchmarks behind the targets
(bench_micro.py), the roofline of the workload, a check that llama.cpp's greedy tokens equal
transformers', and the host's CPU features beside its measured rates. A figure outside what it
can physically be (a negative time, a ratio above its ceiling) is a failed target. Writes
load_tests/reports/bench-<stamp>.json/.png and bench-latest.json/.png; exits 1 when a part failed
(its rows and figures are then missing).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `client` and `tests.oracle` import from the checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from load_tests import bench_llamacpp as peer  # noqa: E402
from load_tests import bench_load as load  # noqa: E402
from load_tests import bench_micro as micro  # noqa: E402
from load_tests import bench_report as report  # noqa: E402
from load_tests.bench_report import (  # noqa: E402
    BASELINE,
    ENGINE,
    LLAMACPP,
    LLAMACPP_BF16,
    LLAMACPP_DEFAULTS,
    LLAMACPP_Q8,
    SERVED,
    SERVED_BF16,
    SERVED_Q8,
    Run,
)

TARGET_SIZE = (448, 448)  # the image size the targets are stated for

# Serving settings of every server the bench starts (the repository defaults otherwise). Every cache
# is off -- the encoder's and preprocessing's image caches, the engine's prefix KV cache and the
# language server's row cache -- as llama.cpp's prompt cache is (`cache_prompt` false, `--cache-ram
# 0`): both sides compute every request (and no request sends an image another sent:
# bench_load.Pool).
SERVER_SETTINGS = dict(max_output_len=256, max_seq_len=2048, max_images=2, engine_max_batch=16, max_batch_size=16,
                       vision_cache_bytes=0, pixel_cache_bytes=0, kv_cache_bytes=0, language_row_cache_bytes=0)


@dataclass
class Config:
    quick: bool
    sizes: tuple[tuple[int, int], ...]
    concurrency: tuple[int, ...]
    disagg_concurrency: tuple[int, ...]
    peer_concurrency: tuple[int, ...] = (1, 8)  # llama.cpp, qwen3vl-bf16/-q8_0 (llama-server has 8 slots)
    max_tokens: int = 128
    warmup_tokens: int = 4
    per_worker: int = 2  # measured requests per worker at concurrency > 1
    single_requests: int = 4  # measured requests at concurrency 1 (and of the baseline, in turn with them)
    chunk_rows: int = 1024  # rows per table chunk of the disaggregated transfer
    split_servers: bool = True  # disaggregated rows on an encoder and a language server
    decode_context: int = 284  # cache length of the decode-step comparison (prompt + 64 tokens)
    overhead_requests: int = 30
    decode_repeats: int = 20

    @classmethod
    def make(cls, quick: bool) -> "Config":
        if quick:
            return cls(True, (TARGET_SIZE,), (1, 8), (1, 8), per_worker=2, single_requests=3,
                       split_servers=False, overhead_requests=15, decode_repeats=10)
        return cls(False, (TARGET_SIZE, (896, 448)), (1, 4, 8, 16), (1, 8), per_worker=3)

    def requests(self, concurrency: int, disagg: bool = False) -> int:
        """Measured requests of a run. Quick runs keep the disaggregated rows to one request per
        worker: the target figures come from the other rows."""
        if concurrency == 1:
            return 1 if disagg and self.quick else self.single_requests
        return concurrency * (1 if disagg and self.quick else self.per_worker)


def log(msg: str) -> None:
    print(msg, flush=True)


def environment(server_version: str = "?") -> dict:
    import numpy
    import torch
    import transformers

    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tritonserver": server_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": round(os.getloadavg()[0], 2),
        **report.cpu_features(),
    }


class HostLoad:
    """CPU that processes other than this one and its children used while the bench ran.

    The figures are ratios measured in the same run, but the baseline and the server do not feel
    a busy host alike (the server's stubs and the client share the same two cores), so a run on
    a busy host does not compare with others. Other processes' share = (the host's busy CPU time
    from /proc/stat - this process's and its reaped children's CPU time) / (wall time x cores);
    time stolen by the hypervisor is reported apart. Servers must be stopped (reaped) before
    `share()` for their CPU time to count as the bench's own."""

    WARN_SHARE = 0.10

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.t0, self.busy0, self.steal0, self.own0 = time.monotonic(), *self._host(), self._own()

    @staticmethod
    def _host() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _own() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def share(self) -> dict:
        busy, steal = self._host()
        capacity = max(time.monotonic() - self.t0, 1e-9) * self.cores
        other = max(0.0, (busy - self.busy0) - (self._own() - self.own0))
        return {"other_processes_cpu_share": round(other / capacity, 3),
                "steal_cpu_share": round((steal - self.steal0) / capacity, 3)}

    @classmethod
    def warnings(cls, shares: dict) -> list[str]:
        out = []
        if shares.get("other_processes_cpu_share", 0) > cls.WARN_SHARE:
            out.append(f"other processes used {100 * shares['other_processes_cpu_share']:.0f}% of this host's CPU "
                       "during the run: its figures do not compare with a run on a quiet host")
        if shares.get("steal_cpu_share", 0) > cls.WARN_SHARE:
            out.append(f"the hypervisor took {100 * shares['steal_cpu_share']:.0f}% of the CPU time (steal): "
                       "the figures do not compare with a run on a quiet host")
        return out


def baseline_jitter_warnings(table: list[dict], limit: float = 1.25) -> list[str]:
    """The sequential baseline's own inter-token latency spread. On a quiet host transformers'
    p90 sits within ~10% of its p50 (8.0-8.4 ms against 8.4-9.0 ms here); noisy runs read 1.3-1.4x
    with no other process on the machine and no steal -- a neighbour on the physical host, which
    HostLoad cannot see -- and every ratio to the baseline moves with it."""
    out = []
    for row in table:
        if row["mode"] == "transformers" and row["itl_p90_ms"] > limit * row["itl_p50_ms"]:
            out.append(f"the baseline's inter-token latency p90 was {row['itl_p90_ms'] / row['itl_p50_ms']:.2f}x "
                       f"its p50 ({row['image']}): the host was noisy during the run, and the ratios to the "
                       "baseline moved with it")
    return out


# -- servers ------------------------------------------------------------------------------------------
def start_server(checkpoint: Path, topology: str, name: str, prepare=None, **settings):
    from qwen3vl_triton.serve.cpu_engine import render_prepared
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import Ports, TritonServer, free_ports

    base = ROOT / "build" / "bench" / name
    base.mkdir(parents=True, exist_ok=True)
    values = dict(SERVER_SETTINGS)
    values.update(settings)
    repo, engine = render_prepared(checkpoint, base / "repository", ROOT / "build", Settings(**values),
                                   topology=topology, log=log)
    log(f"[bench] {name}: engine {engine.describe()}")
    if prepare is not None:  # e.g. floor_repository
        repo = prepare(repo)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, Ports(http, grpc, metrics), build_dir=base, log_file=base / "tritonserver.log")
    t0 = time.perf_counter()
    log(f"[bench] starting tritonserver ({name}: {topology}, {checkpoint.name}) ...")
    server.start(timeout=600, log=log)
    log(f"[bench] {name} ready in {time.perf_counter() - t0:.1f}s on {server.grpc_url}")
    return server


def server_version(url: str) -> str:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        return c.get_server_metadata().version


# -- the parts of a run ----------------------------------------------------------------------------------
def turn_runs(cfg: Config, sessions: dict, size: tuple[int, int], items: dict) -> list[Run]:
    """The concurrency-1 rows of `sessions` (mode -> session), request by request in turn on the
    same item, so that all of them see the same machine: other work on the host moves every row
    alike instead of one of them. Each is sequential, so a run's time is the sum of its
    requests' times. Each session warms up first with a request no run measures. `items[size]`:
    the requests (the bench takes them fresh from its Pool for each phase)."""
    work = items[size][:cfg.single_requests]
    warm = load.warmup_request(size)
    for session in sessions.values():
        session.request(warm, cfg.warmup_tokens)
    runs = {mode: Run(mode, 1, load.size_name(size), cfg.max_tokens, 0.0) for mode in sessions}
    for item in work:
        for mode, session in sessions.items():
            t0 = time.perf_counter()
            sample = session.request(item, cfg.max_tokens)
            runs[mode].seconds += time.perf_counter() - t0
            runs[mode].samples.append(sample)
    for run in runs.values():
        log(f"[bench] {run.mode:14s} c=1  {run.image}: {len(run.samples)} requests, "
            f"{run.tokens / run.seconds:.1f} output tokens/s, TTFT p50 "
            f"{1e3 * statistics.median(x.ttft for x in run.samples):.0f} ms")
    return list(runs.values())


def loop_run(cfg: Config, factory, size: tuple[int, int], pool: load.Pool, concurrency: int, mode: str,
             disagg: bool = False) -> Run:
    """One closed-loop row (the disaggregated rows also at concurrency 1), on requests of its own."""
    work = pool.take(size, cfg.requests(concurrency, disagg))
    return load.closed_loop(factory, work, concurrency, 1, cfg.max_tokens, cfg.warmup_tokens, mode, log,
                            warmup_item=load.warmup_request(size))


def disagg_runs(cfg: Config, encoder_url: str, language_url: str, items: load.Pool, prompt_lengths: dict,
                part) -> list:
    """The disaggregated rows; each run is its own `part`, so one that fails leaves the others."""
    runs = []
    for transport in ("shm", "grpc"):
        for size in cfg.sizes:
            for c in cfg.disagg_concurrency:
                factory = lambda: load.DisaggSession(encoder_url, language_url, transport,  # noqa: E731
                                                     cfg.chunk_rows, prompt_lengths)
                run = part(f"disagg-{transport} c={c} {load.size_name(size)}",
                           lambda: loop_run(cfg, factory, size, items, c, f"disagg-{transport}", disagg=True))
                if run is not None:
                    run.notes = f"chunk_rows={cfg.chunk_rows}"
                    runs.append(run)
    return runs


def shm_transfer(encoder_url: str, language_url: str, item, chunk_rows_options, repeats: int = 10,
                 model_hidden: int = 2048) -> dict:
    """bytes/s of sending a table from the shared-memory region into the language server (the
    sequence is started first; `send_table` alone is timed), against np.copyto of the same bytes.

    First the workload's own table (the encoder writes it into the region), at each chunk size:
    the `small` model's 512-wide table is 1.6 MB, which one chunk request moves in about the
    time of the request itself, so it reads as latency. Then the table a real deployment moves
    for the same image: the same rows at Qwen3-VL-30B-A3B's width (`model_hidden` 2048, fp32
    as the CPU engine holds it), in one chunk -- the target's figure, per byte.

    Beside it, what the transfer is made of (`breakdown`), each measured the same way: one
    request's round trip to the language server that moves no rows (`status`, on the started
    sequence), and in this process the copy the server makes -- pread from the region file into a
    table allocated for the sequence (fresh pages: the kernel zeroes and maps each page at first
    touch) and into one already touched, against np.copyto (pre-touched, the yardstick)."""
    import numpy as np

    from qwen3vl_triton.transfer.sender import Disaggregated, Encoded, TransferStats, send_table

    def timed(d, enc, rows, first_corrid, request_times=None):
        times = []
        for i in range(repeats + 2):
            corrid = first_corrid + i
            d.lang.start(corrid, enc, 8)
            t0 = time.perf_counter()
            d.lang.status(corrid)  # a round trip that moves nothing
            status = time.perf_counter() - t0
            stats = TransferStats()
            send_table(d.lang, corrid, d.source(enc), rows, 0, stats)
            d.lang.end(corrid)
            if i >= 2:  # the first two warm up
                times.append(stats.seconds)
                if request_times is not None:
                    request_times.append(status)
        return statistics.median(times)

    out = {}
    with Disaggregated(encoder_url, language_url, transport="shm", region_bytes=64 * 2**20) as d:
        enc = d.encode(item.prompt, [item.image], 8)
        copy = micro.memcpy_seconds(enc.table_bytes)
        out.update(table_bytes=enc.table_bytes, table_rows=enc.rows, memcpy_gbps=enc.table_bytes / copy / 1e9)
        for rows in chunk_rows_options:
            t = timed(d, enc, rows, 1_000_000 + 100 * rows)
            out[f"chunk_rows_{rows}"] = {"seconds": t, "gbps": enc.table_bytes / t / 1e9, "ratio": copy / t}
        # the real model's table for this image: as many bytes, laid out at the served model's
        # width (the language server holds rows of its own hidden size); one image token is
        # enough for `start`
        nbytes = enc.rows * model_hidden * 4
        rows = nbytes // (enc.hidden * 4)
        table = np.random.default_rng(0).standard_normal((rows, enc.hidden), dtype=np.float32)
        d.transport.write_rows(table)  # where the encoder writes a table: after the region's header
        per_position = enc.mrope_cos_sin.size // enc.input_ids.size
        big = Encoded(np.append(enc.input_ids[:4], enc.input_ids.max()), rows, enc.hidden,
                      enc.mrope_cos_sin[:5 * per_position], 0)
        request_times: list[float] = []
        t = timed(d, big, rows, 2_000_000, request_times)
        copy = micro.memcpy_seconds(table.nbytes)
        region_file = Path("/dev/shm") / d.shm_key.lstrip("/")
        parts = micro.region_copy_seconds(region_file, d.transport.table_offset, table.nbytes)
        out["model_size_table"] = {"bytes": table.nbytes, "model_hidden": model_hidden, "chunk_rows": rows,
                                   "seconds": t, "gbps": table.nbytes / t / 1e9,
                                   "memcpy_gbps": table.nbytes / copy / 1e9, "ratio": copy / t,
                                   "breakdown_ms": {"transfer": 1e3 * t, "memcpy": 1e3 * copy,
                                                    "request_round_trip": 1e3 * statistics.median(request_times),
                                                    **{k: 1e3 * v for k, v in parts.items()}}}
    return out


def floor_repository(repo: Path) -> Path:
    """Turn a rendered `single` repository into the overhead floor: the same ensemble, configs
    and tensors, with models that do no work (load_tests/floor/)."""
    import shutil

    here = Path(__file__).resolve().parent / "floor"
    # postprocessing stays real: it is the hop that runs tensorrt_llm for the request, and its
    # own work for one token (a detokenizer step) is what the floor keeps of it
    for model in ("preprocessing", "vision_encoder"):
        version = repo / model / "1"
        (version / "model.py").rename(version / "real_model.py")
        shutil.copy(here / "cached_model.py", version / "model.py")
    shutil.copy(here / "tensorrt_llm_model.py", repo / "tensorrt_llm" / "1" / "model.py")
    return repo


def overhead(checkpoint: Path, url: str, floor_url: str, requests: int, gguf=None) -> dict:
    """Server overhead per request, on the tiny profile (its compute is a few milliseconds, so
    what the server adds shows): a 1-token request with a 64x64 image and a short prompt.

    Per round, in turn, on the same request (each round its own image; the servers' encoder
    cache is off, as in every bench server): `in_process` -- the same work in this process through
    the same package code and the same engine (preprocess, vision encode, engine prefill + first
    token through the engine thread, detokenize); `served` -- send on an open gRPC stream to the
    final response of `qwen3vl`; `floor` -- the same on the floor repository's server
    (floor_repository: the same ensemble, configs and tensors, models that compute nothing:
    Triton's own share); `client_generate` -- the client library, which opens a stream per
    request (reported, not in the figure). Per round, overhead = served - in_process, and above
    the floor = overhead - floor (the floor's own in-process work is nothing); the figures are
    the medians over rounds of these paired differences, so a load that comes and goes falls on
    both sides of each. Triton's per-model statistics come along."""
    import torch

    from client import Client
    from qwen3vl_triton.engine.engine import Engine
    from qwen3vl_triton.engine.scheduler import Request
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.serve.cpu_engine import engine_threads
    from qwen3vl_triton.text.detok import IncrementalDetokenizer
    from qwen3vl_triton.text.preprocess import Preprocessor

    prompt = "Describe this image in short."
    images = [load.seeded_image(64, 64, seed=2_000_000 + i) for i in range(requests + 5)]
    spec = ModelSpec.load(checkpoint)
    pre, enc = Preprocessor(spec, max_images=2), VisionEncoder(spec)
    # One thread in process, as the server runs this work: the tiny model's ops are too small for
    # a second thread to pay (the server's stubs pick one thread for it too), and a team of two
    # would make the reference, not the server, suffer when the host is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prefill, decode = engine_threads("ggml" if gguf else "torch", os.cpu_count() or 1)  # as served
    engine = Engine(spec, max_batch=16, max_seq_len=2048, max_output_len=256, threads=prefill, shared_threads=decode,
                    runner="ggml" if gguf else "torch", gguf=gguf)
    detok = IncrementalDetokenizer(pre.tokenizer)

    def in_process(image):
        p = pre(prompt, [image])
        r = enc.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        ids, _ = engine.generate(Request(p.input_ids, 1, end_id=spec.end_id, table=r.prompt_embedding_table,
                                         mrope_cos_sin=r.mrope_rotary_cos_sin, mrope_delta=r.mrope_position_deltas))
        detok.add(ids)

    stream, floor = load.OpenStream(url), load.OpenStream(floor_url)
    client = Client(url, protocol="grpc")
    kinds = {"in_process": in_process, "served": lambda image: stream.generate(prompt, [image], 1),
             "floor": lambda image: floor.generate(prompt, [image], 1),
             "client_generate": lambda image: client.generate_text(prompt, [image], max_tokens=1)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for i, image in enumerate(images):
            for name, fn in kinds.items():
                t0 = time.perf_counter()
                fn(image)
                if i >= 5:  # warm-up
                    times[name].append(time.perf_counter() - t0)
    finally:
        engine.shutdown()
        stream.close()
        floor.close()
        client.close()
        torch.set_num_threads(threads)
    out = {f"{k}_p50_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_min_ms": 1e3 * min(v) for k, v in times.items()})
    paired = [s - p for s, p in zip(times["served"], times["in_process"])]
    out["overhead_ms"] = 1e3 * statistics.median(paired)
    out["overhead_above_floor_ms"] = 1e3 * statistics.median([d - f for d, f in zip(paired, times["floor"])])
    out["runner"] = engine.runner_name
    out["triton_stats_ms"] = triton_stats(url)
    return out


def triton_stats(url: str) -> dict:
    """Per model: average queue and compute milliseconds per request, from Triton's statistics."""
    import tritonclient.grpc as grpcclient

    out = {}
    with grpcclient.InferenceServerClient(url) as c:
        stats = c.get_inference_statistics(as_json=True)
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        n = int(s.get("success", {}).get("count", 0)) or 1
        out[m["name"]] = {k: int(s.get(k, {}).get("ns", 0)) / n / 1e6
                          for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    return out


def roofline(cfg: Config, checkpoint: Path, rates: dict, prompt_len: dict, decode: dict) -> dict:
    """FLOPs of the workload's prefill (vision tower + language model) and bytes one decode step
    reads, against the machine's measured matmul rate and read bandwidth."""
    import torch

    from qwen3vl_triton.engine.scheduler import Request  # noqa: F401 -- engine import keeps lm's deps loaded
    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.lm import LanguageModel, StepSeq
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.text.preprocess import Preprocessor

    spec = ModelSpec.load(checkpoint)
    pre, enc = Preprocessor(spec, max_images=2), VisionEncoder(spec)
    item = load.workload(TARGET_SIZE, 1)[0]
    p = pre(item.prompt, [item.image])
    vision_flops = micro.count_flops(lambda: enc.features(p.pixel_values, p.image_grid_thw))
    r = enc.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
    lm = LanguageModel(spec, slots=1, max_len=p.input_ids.size + 8)
    cos, sin = mrope.unpack_cos_sin(r.mrope_rotary_cos_sin, spec, p.input_ids.size)
    seq = StepSeq(0, torch.from_numpy(p.input_ids.astype("int64")), 0, cos, sin, r.prompt_embedding_table)
    lm_flops = micro.count_flops(lambda: lm.forward([seq]))
    gflops, gbps = rates["matmul_gflops"], rates["read_gbps"]
    ctx = decode["context"]
    b1 = micro.decode_step_bytes(spec, 1, ctx)
    b8 = micro.decode_step_bytes(spec, 8, ctx)
    b1_bf16 = micro.decode_step_bytes(spec, 1, ctx, dtype_bytes=2)
    return {
        "prompt_tokens": int(p.input_ids.size),
        "vision_prefill_gflop": vision_flops / 1e9,
        "lm_prefill_gflop": lm_flops / 1e9,
        "matmul_gflops_measured": gflops,
        "matmul_bf16_gflops_measured": rates["matmul_bf16_gflops"],
        "read_gbps_measured": gbps,
        "prefill_floor_ms": 1e3 * (vision_flops + lm_flops) / (gflops * 1e9),
        "decode_b1_mbytes": b1["total"] / 1e6,
        "decode_b8_mbytes": b8["total"] / 1e6,
        "decode_b8_experts_per_layer": b8["experts_per_layer"],
        "decode_b1_floor_ms": 1e3 * b1["total"] / (gbps * 1e9),
        "decode_b8_floor_ms": 1e3 * b8["total"] / (gbps * 1e9),
        "decode_b1_bf16_mbytes": b1_bf16["total"] / 1e6,
        "decode_b1_bf16_floor_ms": 1e3 * b1_bf16["total"] / (gbps * 1e9),
        # q8_0: 34 bytes per 32 weights, f16 KV cells (the ggml runner's)
        "decode_b1_q8_floor_ms": 1e3 * (micro.decode_step_bytes(spec, 1, ctx, dtype_bytes=34 / 32)["weights"]
                                        + micro.decode_step_bytes(spec, 1, ctx, dtype_bytes=2)["kv_cache"])
                                 / (gbps * 1e9),
        "decode_b1_engine_ms": decode["engine_b1_ms"],
        "decode_b8_engine_ms": decode["engine_b8_ms"],
        "decode_b8_transformers_ms": decode["transformers_b8_ms"],
        # one request's compute at concurrency 8: its prefill plus an eighth of each b8 step
        "c8_tokens_per_s_ceiling": cfg.max_tokens / ((vision_flops + lm_flops) / (gflops * 1e9)
                                                     + cfg.max_tokens * b8["total"] / (gbps * 1e9) / 8),
    }


# -- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: every row and target figure, fewer requests")
    ap.add_argument("--out-dir", default=str(ROOT / "load_tests" / "reports"))
    ap.add_argument("--checkpoint", help="the `small` profile checkpoint (default: build checkpoints/small)")
    ap.add_argument("--tiny-checkpoint", help="the `tiny` checkpoint for the overhead figure")
    args = ap.parse_args(argv)

    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.text.preprocess import Preprocessor

    cfg = Config.make(args.quick)
    t_start = time.perf_counter()
    host = HostLoad()
    small = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "small", "small",
                                                                             log=log)
    tiny = Path(args.tiny_checkpoint) if args.tiny_checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "tiny",
                                                                                     "tiny", log=log)
    env = environment()
    log(f"[bench] {'quick' if cfg.quick else 'full'} run; {env['cores']} cores, torch {env['torch']}, "
        f"transformers {env['transformers']}, load average {env['loadavg_start']}")

    spec = ModelSpec.load(small)
    pool = load.Pool(Preprocessor(spec, max_images=2))  # every request its own image
    prompt_lengths = pool.prompt_lengths

    from qwen3vl_triton.serve.cpu_engine import engine_threads, prepare
    from qwen3vl_triton.serve.repository import Settings

    # the served engine's weights (the default: the ggml runner, float32), converted once
    served_engine = prepare(spec, Settings(**SERVER_SETTINGS), "cpu", ROOT / "build", log=log)
    env["served_engine"] = served_engine.describe()
    rates = micro.machine_rates()
    log(f"[bench] {report.format_machine(rates)}")
    decode = micro.decode_step(small, cfg.decode_context, repeats=cfg.decode_repeats, log=log)
    if served_engine.runner == "ggml":
        decode["ggml"] = micro.ggml_decode_step(small, served_engine.gguf, cfg.decode_context,
                                                repeats=cfg.decode_repeats, log=log)
    roof = roofline(cfg, small, rates, prompt_lengths, decode)

    micro_figs: dict = {"decode_step": decode, "machine": rates,
                        "decode_step_b8_ratio": decode["decode_step_b8_ratio"],
                        # the served engine's batch-1 step against the bytes it must read (f32 weights and cells)
                        "decode_step_b1_vs_floor": (decode["ggml"]["b1_ms"] / roof["decode_b1_floor_ms"]
                                                    if "ggml" in decode else float("nan"))}

    errors: dict[str, str] = {}  # a part that fails is reported, and its figures stay unmeasured
    check_warnings: list[str] = []

    def part(name: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- the other parts still run and the report is written
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"[bench] {name} FAILED: {traceback.format_exc()}")
            return None

    runs: list = []

    def prepare_peer():
        """llama-server (built once) and the GGUF files of the bench's checkpoint: f32, bf16, q8_0."""
        from builders.llamacpp import build, convert

        binary = build.ensure_server()
        files = {outtype: convert.ensure_gguf(small, outtype, log=log) for outtype in ("f32", "bf16", "q8_0")}
        env["llamacpp"] = f"llama-cpp-python {build.VERSION} sdist, {peer.server_version(binary)}"
        return binary, files

    peer_files = part("llama.cpp build and conversion", prepare_peer)

    # the peer decodes and prefills on the threads the served engine takes (same kernels, same threads)
    peer_prefill, peer_decode = engine_threads("ggml", os.cpu_count() or 1)
    env["llamacpp_threads"] = {"threads": peer_decode, "threads_batch": peer_prefill}
    env["llamacpp_kv"] = {outtype: dict(zip(("cells", "flash_attention"), peer.peer_kv(outtype)))
                          for outtype in ("f32", "bf16", "q8_0")} | {"f32-defaults": "llama-server's own"}

    def start_peer(outtype: str, defaults: bool = False) -> peer.LlamaServer:
        """llama-server on the `outtype` GGUF files with the served engine's KV cells and attention
        for that dtype (like with like), or, `defaults`, with llama-server's own (f16 cells, flash
        attention): an informational row beside the target's."""
        binary, files = peer_files
        kv_type, flash_attn = (None, None) if defaults else peer.peer_kv(outtype)
        name = f"llamacpp-{outtype}" + ("-defaults" if defaults else "")
        log_file = ROOT / "build" / "bench" / name / "llama-server.log"
        return peer.LlamaServer(binary, *files[outtype], log_file, threads=peer_decode, threads_batch=peer_prefill,
                                kv_type=kv_type, flash_attn=flash_attn).start(log=log)

    def peer_rows(sessions: dict, factories: dict):
        """The c=1 rows of `sessions` in turn, then each of `factories`' closed loops above c=1;
        each is its own part."""
        try:
            for size in cfg.sizes:
                if sessions:
                    items = {size: pool.take(size, cfg.single_requests)}
                    runs.extend(part(f"c=1 rows {load.size_name(size)} ({', '.join(sessions)})",
                                     lambda: turn_runs(cfg, sessions, size, items)) or [])
        finally:
            for session in sessions.values():
                session.close()
        for size in cfg.sizes:
            for c in (c for c in cfg.peer_concurrency if c > 1):
                for mode, factory in factories.items():
                    run = part(f"{mode} c={c} {load.size_name(size)}",
                               lambda: loop_run(cfg, factory, size, pool, c, mode))
                    if run is not None:
                        runs.append(run)

    def greedy_checks(served: load.EnsembleSession, base: load.TransformersBaseline, llama) -> None:
        """Served text = transformers' (greedy, token for token) per image size; llama.cpp f32's
        ids against transformers' on each prompt of the workload as text only (the peer computes
        the same model) and on the first 448x448 request. A mixture-of-experts router whose k-th
        and (k+1)-th experts score within float32 rounding of each other can split two correct
        implementations, so a difference is reported where it starts; only no text prompt equal
        at all is warned about."""
        micro_figs["greedy_text_equal"] = {}
        for size in cfg.sizes:
            (item,) = pool.take(size, 1)
            served.request(item, cfg.max_tokens)
            micro_figs["greedy_text_equal"][load.size_name(size)] = \
                served.texts[-1] == base.text(base.ids(item, cfg.max_tokens))
        if llama is None:
            return
        (item,) = pool.take(TARGET_SIZE, 1)
        checks = {f"text: {prompt}": peer.greedy_check(llama, base.oracle, prompt, [], cfg.max_tokens)
                  for prompt in load.PROMPTS}
        checks[f"image {load.size_name(TARGET_SIZE)}: {item.prompt}"] = peer.greedy_check(
            llama, base.oracle, item.prompt, [item.image], cfg.max_tokens)
        micro_figs["llamacpp_f32_greedy"] = checks
        for name, check in checks.items():
            log(f"[bench] llama.cpp f32 greedy ids vs transformers ({name}): "
                + ("equal" if check["equal"] else f"first difference at token {check['first_difference']}")
                + f" of {check['tokens']}; prompt tokens {check['prompt_tokens']} (transformers "
                  f"{check['oracle_prompt_tokens']})")
        if not any(c["equal"] for name, c in checks.items() if name.startswith("text")):
            check_warnings.append("llama.cpp f32's greedy tokens differ from transformers' on every text prompt: "
                                  "the GGUF conversion does not compute the same model, and the llama.cpp rows "
                                  "do not compare")

    def single_server():
        server = start_server(small, "all", "small-all")
        llama = llama_defaults = engine = None
        try:
            env["tritonserver"] = server_version(server.grpc_url)
            llama = part("llama.cpp f32 server", lambda: start_peer("f32")) if peer_files else None
            # llama-server with its own defaults (f16 cells, flash attention), at c=1 beside the
            # like-with-like row: what a llama.cpp user gets out of the box
            llama_defaults = part("llama.cpp f32 server (its defaults)",
                                  lambda: start_peer("f32", defaults=True)) if peer_files else None
            base = load.TransformersBaseline(small)
            # the served engine's class in this process, in turn with the served row: the in-process
            # side of serving_ms_per_token
            engine = load.EngineSession(small, prompt_lengths, SERVER_SETTINGS, runner=served_engine.runner,
                                        gguf=served_engine.gguf)
            sessions = {BASELINE: base, SERVED: load.EnsembleSession(server.grpc_url, prompt_lengths), ENGINE: engine}
            factories = {SERVED: lambda: load.EnsembleSession(server.grpc_url, prompt_lengths)}
            if llama is not None:
                sessions[LLAMACPP] = peer.LlamaCppSession(llama.address)
                factories[LLAMACPP] = lambda: peer.LlamaCppSession(llama.address)
            if llama_defaults is not None:
                sessions[LLAMACPP_DEFAULTS] = peer.LlamaCppSession(llama_defaults.address)
            try:
                for size in cfg.sizes:
                    runs.extend(turn_runs(cfg, sessions, size, {size: pool.take(size, cfg.single_requests)}))
                    if size == TARGET_SIZE:
                        steps = list(engine.steps_ms)
                        micro_figs["serving"] = {"engine_runner": engine.runner, "engine_steps": len(steps),
                                                 "engine_step_b1_ms": statistics.median(steps),
                                                 "engine_step_b1_p90_ms": statistics.quantiles(steps, n=10)[-1]}
                part("greedy checks", functools.partial(greedy_checks, sessions[SERVED], base, sessions.get(LLAMACPP)))
            finally:
                for session in sessions.values():
                    session.close()
            del base, sessions, engine  # the servers' rows run without transformers in memory
            for size in cfg.sizes:
                for c in cfg.concurrency:
                    if c > 1:
                        runs.append(loop_run(cfg, factories[SERVED], size, pool, c, SERVED))
            if LLAMACPP in factories:
                peer_rows({}, {LLAMACPP: factories[LLAMACPP]})
            if not cfg.split_servers:
                disaggregated(server.grpc_url, server.grpc_url)
        finally:
            for peer_server in (llama, llama_defaults):
                if peer_server is not None:
                    peer_server.stop()
            server.stop()

    def variant(dtype: str, served_mode: str, peer_mode: str, outtype: str):
        """qwen3vl served with `dtype` (a server that refuses the setting is a failed part, with the
        server's own error) and llama.cpp on the `outtype` GGUF files, in turn at c=1, then each
        closed loop above it."""
        served = part(f"qwen3vl {dtype} server", lambda: start_server(small, "all", f"small-all-{dtype}", dtype=dtype))
        llama = part(f"llama.cpp {outtype} server", lambda: start_peer(outtype)) if peer_files else None
        try:
            sessions, factories = {}, {}
            if served is not None:
                factories[served_mode] = lambda: load.EnsembleSession(served.grpc_url, prompt_lengths)
            if llama is not None:
                factories[peer_mode] = lambda: peer.LlamaCppSession(llama.address)
            sessions = {mode: factory() for mode, factory in factories.items()}
            peer_rows(sessions, factories)
        finally:
            if llama is not None:
                llama.stop()
            if served is not None:
                served.stop()

    def disaggregated(encoder_url: str, language_url: str):
        (item,) = pool.take(max(cfg.sizes, key=lambda wh: wh[0] * wh[1]), 1)
        micro_figs["shm_transfer"] = part("shm transfer", lambda: shm_transfer(
            encoder_url, language_url, item, (64, cfg.chunk_rows)))
        runs.extend(disagg_runs(cfg, encoder_url, language_url, pool, prompt_lengths, part))

    def split_servers():
        encoder = start_server(small, "encoder", "small-encoder")
        try:
            # the row cache off (SERVER_SETTINGS): the shm transfer and every disaggregated request
            # move their whole table, as the bench's figures say
            language = start_server(small, "language", "small-language")
            try:
                disaggregated(encoder.grpc_url, language.grpc_url)
            finally:
                language.stop()
        finally:
            encoder.stop()

    def tiny_overhead():
        """The tiny server and its floor up together, measured in turn (see `overhead`)."""
        tiny_server = start_server(tiny, "single", "tiny-single")
        try:
            floor_server = start_server(tiny, "single", "tiny-floor", prepare=floor_repository)
            try:
                gguf = prepare(ModelSpec.load(tiny), Settings(**SERVER_SETTINGS), "cpu", ROOT / "build",
                               log=lambda *_: None).gguf
                return overhead(tiny, tiny_server.grpc_url, floor_server.grpc_url, cfg.overhead_requests, gguf)
            finally:
                floor_server.stop()
        finally:
            tiny_server.stop()

    part("single server", single_server)
    part("bf16", lambda: variant("bfloat16", SERVED_BF16, LLAMACPP_BF16, "bf16"))
    part("q8_0", lambda: variant("q8_0", SERVED_Q8, LLAMACPP_Q8, "q8_0"))
    if cfg.split_servers:
        part("disaggregated servers", split_servers)
    shm = micro_figs.get("shm_transfer") or {}
    micro_figs["shm_vs_memcpy_ratio"] = shm.get("model_size_table", {}).get("ratio", float("nan"))
    micro_figs["overhead"] = part("overhead", tiny_overhead) or {}
    micro_figs["overhead_ms"] = micro_figs["overhead"].get("overhead_ms", float("nan"))
    # Triton's own share: the same ensemble whose models compute nothing (load_tests/floor/), in turn
    micro_figs["overhead_floor_ms"] = micro_figs["overhead"].get("floor_p50_ms", float("nan"))
    micro_figs["overhead_above_floor_ms"] = micro_figs["overhead"].get("overhead_above_floor_ms", float("nan"))

    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    env.update(host.share())  # every server has been stopped and reaped by now
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    config = {k: v for k, v in vars(cfg).items()}
    config["server_settings"] = SERVER_SETTINGS
    config["target_image"] = load.size_name(TARGET_SIZE)
    data = report.report(runs, micro_figs, env, roof, load.size_name(TARGET_SIZE), config)
    data["errors"] = errors
    data["warnings"] = HostLoad.warnings(env) + baseline_jitter_warnings(data["table"]) + check_warnings
    paths = report.write(data, Path(args.out_dir), time.strftime("%Y%m%d-%H%M%S"))
    log("")
    log(report.render_text(data))
    log("")
    log(f"[bench] wrote {paths['json']}, {paths['png']} and {paths['latest_json']} in {env['seconds']}s")
    for message in data["warnings"]:
        log(f"[bench] WARNING: {message}")
    for name, message in errors.items():
        log(f"[bench] FAILED part: {name}: {message}")
    return 1 if errors else 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
