"""The benchmark's numbers -> table rows, targets, printed table, JSON and a PNG plot.

Pure functions over measured samples, so the test suite runs them on synthetic numbers
(tests/test_bench.py). Nothing here measures anything.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Row modes of the table.
BASELINE = "transformers"  # in process, sequential: the baseline of the `x baseline` column
SERVED = "qwen3vl"  # the single-server ensemble, float32
SERVED_BF16 = "qwen3vl-bf16"  # the same, served with dtype=bfloat16
SERVED_Q8 = "qwen3vl-q8_0"  # the same, served with dtype=q8_0 (the ggml runner's quantized weights)
ENGINE = "engine"  # the served engine's class in the bench's process (same runner, dtype, threads), c=1
LLAMACPP = "llama.cpp-f32"  # llama-server on the f32 GGUF files, the served engine's KV cells (f32)
LLAMACPP_DEFAULTS = "llama.cpp-f32-defaults"  # the same with llama-server's own KV (f16, flash attention), c=1
LLAMACPP_BF16 = "llama.cpp-bf16"  # llama-server on the bf16 GGUF files
LLAMACPP_Q8 = "llama.cpp-q8_0"  # llama-server on the q8_0 GGUF files

# name -> (comparison, limit, what the figure is). The keys are the report's contract.
TARGETS: dict[str, tuple[str, float, str]] = {
    # ITL: a request's mean time per token after the first (bench_report.ITL); p50 over the requests
    "itl_c1_vs_llamacpp": ("<=", 1.1, "ITL p50 (a request's mean ms per token after the first, p50 over the "
                                      "requests) of qwen3vl at concurrency 1 / llama.cpp f32's"),
    "throughput_c8_vs_llamacpp": (">=", 1.5, "output tokens/s of qwen3vl at concurrency 8 / llama.cpp f32's"),
    "ttft_c1_vs_llamacpp": ("<=", 0.75, "TTFT p50 of qwen3vl at concurrency 1 / llama.cpp f32's"),
    "itl_c1_q8_vs_llamacpp": ("<=", 1.1, "ITL p50 of qwen3vl served in q8_0 at concurrency 1 / "
                                         "llama.cpp q8_0's"),
    "throughput_c8_q8_vs_llamacpp": (">=", 1.5, "output tokens/s of qwen3vl served in q8_0 at concurrency 8 / "
                                                "llama.cpp q8_0's"),
    "ttft_c1_bf16_vs_llamacpp": ("<=", 0.5, "TTFT p50 of qwen3vl served in bfloat16 at concurrency 1 / "
                                            "llama.cpp bf16's"),
    "itl_c1_bf16_vs_llamacpp": ("<=", 1.25, "ITL p50 of qwen3vl served in bfloat16 at "
                                            "concurrency 1 / llama.cpp bf16's"),
    "throughput_c8_ratio": (">=", 4.0, "output tokens/s of qwen3vl (gRPC streaming) at concurrency 8 / the "
                                       "sequential transformers baseline's"),
    "ttft_c1_ratio": ("<=", 1.0, "TTFT p50 of qwen3vl at concurrency 1 / the baseline's in-process time to the "
                                 "first token (image decode and preprocessing included on both sides)"),
    "decode_step_b8_ratio": ("<=", 0.5, "the torch runner's LanguageModel.forward, 8 decode sequences / "
                                        "transformers' forward with a batch of 8 and a DynamicCache, same weights "
                                        "and context length"),
    "decode_step_b1_vs_floor": ("<=", 2.0, "the served engine's batch-1 decode step (ggml runner, float32) / the "
                                           "bytes it must read over the machine's measured read rate"),
    "serving_ms_per_token": ("<=", 0.5, "ITL p50 of qwen3vl at concurrency 1 minus the served "
                                        "engine's batch-1 decode step in the bench's process (same runner, dtype "
                                        "and threads), measured in turn with it on the same requests (ms)"),
    "shm_vs_memcpy_ratio": (">=", 0.25, "bytes/s of the shared-memory chunk transfer into the language server of "
                                        "the table Qwen3-VL-30B-A3B (hidden 2048, fp32) has for the workload's "
                                        "largest image / bytes/s of np.copyto of the same bytes"),
    "overhead_above_floor_ms": ("<=", 1.0, "tiny profile, 1-token request: the server's overhead (served p50 at "
                                           "the client minus the in-process p50 of the same work) minus the same "
                                           "figure of the ensemble whose models do no work (Triton's own share), "
                                           "all three measured in turn on the same requests"),
}

# What each figure can physically be; one outside its bounds is a broken measurement, never a met
# target. A ratio of two times or rates is positive; serving adds time to a token, it cannot take
# any away; a step reads its bytes no faster than the machine reads memory; a transfer that copies
# the bytes at least once is no faster than one memcpy of them.
PHYSICAL: dict[str, tuple[float, float, str]] = {
    "serving_ms_per_token": (0.0, float("inf"), "serving cannot make a token faster than the engine computes it"),
    "overhead_above_floor_ms": (0.0, float("inf"), "our stubs cannot cost less than nothing above Triton's floor"),
    "decode_step_b1_vs_floor": (1.0, float("inf"), "a step cannot read its bytes faster than the machine reads "
                                                   "memory"),
    "shm_vs_memcpy_ratio": (0.0, 1.0, "a transfer that copies the table is no faster than one memcpy of it"),
}
POSITIVE = (0.0, float("inf"), "a ratio of two times or rates is positive")

# bf16 figures are targets only on a host with bf16 matrix instructions (AMX-BF16 or AVX512-BF16, the
# ones torch's and ggml's bf16 matmuls run on); elsewhere they are measured and reported
BF16_KEYS = ("ttft_c1_bf16_vs_llamacpp", "itl_c1_bf16_vs_llamacpp")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_features(path: str = "/proc/cpuinfo") -> dict:
    """The x86 features the kernels pick from (AVX2, AVX-512 and its extensions, AMX), and the model."""
    flags, model = set(), "?"
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name" and model == "?":
                    model = value.strip()
    except OSError:
        pass
    wanted = sorted(f for f in flags if f in ("avx", "avx2", "fma", "f16c") or f.startswith(("avx512", "amx")))
    return {"cpu_model": model, "cpu_flags": wanted,
            "bf16_matrix_instructions": [f for f in BF16_FLAGS if f in flags]}


COLUMNS = [  # (key, header, format)
    ("mode", "mode", "{}"),
    ("concurrency", "conc", "{}"),
    ("input_tokens", "in tok", "{}"),
    ("image", "image", "{}"),
    ("output_tokens", "out tok", "{}"),
    ("requests", "reqs", "{}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.2f}"),
    ("itl_p90_ms", "ITL p90 ms", "{:.2f}"),
    ("decode_ms_p50", "ms/tok p50", "{:.2f}"),
    ("tokens_per_s", "out tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.3f}"),
    ("ratio", "x baseline", "{:.2f}"),
]


@dataclass
class Sample:
    """One measured request: seconds from its start to its first token and to each token."""

    ttft: float
    token_times: list[float]  # arrival of every generated token, seconds since the request started
    input_tokens: int = 0

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def inter_token(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []

    @property
    def decode_interval(self) -> float:
        """Seconds per token after the first: (last arrival - first arrival) / (tokens - 1). Unlike
        the gaps, it does not depend on how the tokens were grouped on the way (a response path
        that stalls and then delivers many tokens at once gives tiny gaps, not a faster decode)."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan")


@dataclass
class Run:
    """One row of the table: a mode at a concurrency on one image size, warm-up excluded."""

    mode: str  # BASELINE, SERVED, SERVED_BF16, LLAMACPP, LLAMACPP_BF16, "disagg-shm", "disagg-grpc"
    concurrency: int
    image: str  # "448x448"
    max_tokens: int  # output tokens asked for per request
    seconds: float  # wall time of the measured phase
    samples: list[Sample] = field(default_factory=list)
    notes: str = ""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def row(run: Run, baseline: Run | None) -> dict:
    """The table row of `run`; `ratio` is its output tokens/s over the baseline's (same image)."""
    ttft = [s.ttft for s in run.samples]
    itl = [g for s in run.samples for g in s.inter_token]
    tps = run.tokens / run.seconds if run.seconds > 0 else float("nan")
    base_tps = baseline.tokens / baseline.seconds if baseline and baseline.seconds > 0 else float("nan")
    short = sum(1 for s in run.samples if s.tokens < run.max_tokens)
    return {
        "mode": run.mode,
        "concurrency": run.concurrency,
        "input_tokens": int(np.median([s.input_tokens for s in run.samples])) if run.samples else 0,
        "image": run.image,
        "output_tokens": int(np.median([s.tokens for s in run.samples])) if run.samples else 0,
        "max_tokens": run.max_tokens,
        "short_requests": short,  # requests that stopped before max_tokens (the workload avoids them)
        "requests": len(run.samples),
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p90_ms": 1e3 * percentile(ttft, 90),
        "itl_p50_ms": 1e3 * percentile(itl, 50),
        "itl_p90_ms": 1e3 * percentile(itl, 90),
        # per request, the mean time per token after the first; p50 over the requests: what the
        # ITL targets compare (see Sample.decode_interval)
        "decode_ms_p50": 1e3 * percentile([s.decode_interval for s in run.samples if s.tokens > 1], 50),
        "tokens_per_s": tps,
        "requests_per_s": len(run.samples) / run.seconds if run.seconds > 0 else float("nan"),
        "ratio": tps / base_tps,
        "seconds": run.seconds,
        "notes": run.notes,
    }


def rows(runs: list[Run]) -> list[dict]:
    """Rows of every run, each compared with the transformers baseline on the same image size."""
    baselines = {r.image: r for r in runs if r.mode == "transformers"}
    return [row(r, baselines.get(r.image)) for r in runs]


def find(table: list[dict], mode: str, concurrency: int, image: str) -> dict | None:
    return next((r for r in table if r["mode"] == mode and r["concurrency"] == concurrency and r["image"] == image),
                None)


def _ratio(a: dict | None, b: dict | None, key: str) -> float:
    return a[key] / b[key] if a and b and b[key] else float("nan")


# The inter-token latency the targets compare: per request, the mean time per token after the
# first, p50 over the requests (Sample.decode_interval). The gaps' own percentiles (itl_p50_ms)
# stay in the table: on a host whose cores are oversubscribed a starved process on the response
# path holds tokens and then delivers them together, and the gaps read 0.05 ms while the decode
# ran at its step's pace.
ITL = "decode_ms_p50"


def target_figures(table: list[dict], image: str, micro: dict) -> dict[str, float]:
    """The target figures from the table (`image`: the target workload) and the micro-benchmarks;
    a figure whose rows or measurement are missing is NaN."""
    nan = float("nan")
    base = find(table, BASELINE, 1, image)
    c1, c8 = find(table, SERVED, 1, image), find(table, SERVED, 8, image)
    l1, l8 = find(table, LLAMACPP, 1, image), find(table, LLAMACPP, 8, image)
    b1, lb1 = find(table, SERVED_BF16, 1, image), find(table, LLAMACPP_BF16, 1, image)
    q1, lq1 = find(table, SERVED_Q8, 1, image), find(table, LLAMACPP_Q8, 1, image)
    q8, lq8 = find(table, SERVED_Q8, 8, image), find(table, LLAMACPP_Q8, 8, image)
    # the served engine's batch-1 step in process, timed in turn with the served c=1 row
    engine_b1 = float((micro.get("serving") or {}).get("engine_step_b1_ms", nan))
    return {
        "itl_c1_vs_llamacpp": _ratio(c1, l1, ITL),
        "throughput_c8_vs_llamacpp": _ratio(c8, l8, "tokens_per_s"),
        "ttft_c1_vs_llamacpp": _ratio(c1, l1, "ttft_p50_ms"),
        "itl_c1_q8_vs_llamacpp": _ratio(q1, lq1, ITL),
        "throughput_c8_q8_vs_llamacpp": _ratio(q8, lq8, "tokens_per_s"),
        "ttft_c1_bf16_vs_llamacpp": _ratio(b1, lb1, "ttft_p50_ms"),
        "itl_c1_bf16_vs_llamacpp": _ratio(b1, lb1, ITL),
        "throughput_c8_ratio": c8["ratio"] if c8 else nan,
        "ttft_c1_ratio": _ratio(c1, base, "ttft_p50_ms"),
        "decode_step_b8_ratio": float(micro.get("decode_step_b8_ratio", nan)),
        "decode_step_b1_vs_floor": float(micro.get("decode_step_b1_vs_floor", nan)),
        "serving_ms_per_token": c1[ITL] - engine_b1 if c1 else nan,
        "shm_vs_memcpy_ratio": float(micro.get("shm_vs_memcpy_ratio", nan)),
        "overhead_above_floor_ms": float(micro.get("overhead_above_floor_ms", nan)),
    }


# the ITL figures' served rows and the roofline floor (ms per token, batch 1) each cannot beat
ITL_FLOORS = {"itl_c1_vs_llamacpp": (SERVED, "decode_b1_floor_ms"),
              "itl_c1_q8_vs_llamacpp": (SERVED_Q8, "decode_b1_q8_floor_ms"),
              "itl_c1_bf16_vs_llamacpp": (SERVED_BF16, "decode_b1_bf16_floor_ms")}


def below_floor(table: list[dict], image: str, roofline: dict) -> dict[str, str]:
    """ITL figures whose served row reads faster than the machine can read the bytes of a decode
    step (name -> why): no token is computed faster than that, so the figure measured something
    else (tokens held and delivered together, a clock error) and is impossible."""
    out = {}
    for name, (mode, floor_key) in ITL_FLOORS.items():
        r, floor = find(table, mode, 1, image), roofline.get(floor_key)
        if r and floor and np.isfinite(r[ITL]) and r[ITL] < floor:
            out[name] = (f"{mode} reads {r[ITL]:.3f} ms per token, below the {floor:.3f} ms a batch-1 step needs "
                         "to read its bytes")
    return out


def status(name: str, value: float, bf16_host: bool = True, broken: dict | None = None) -> str:
    """"met", "missed", "impossible" (outside what the figure can physically be: the measurement is
    broken), "unmeasured" (NaN) or "reported" (a bf16 figure on a host without bf16 matrix
    instructions: measured, not a target)."""
    if name in BF16_KEYS and not bf16_host:
        return "reported"
    if not np.isfinite(value):
        return "unmeasured"
    if broken and name in broken:
        return "impossible"
    low, high, _ = PHYSICAL.get(name, POSITIVE)
    if not (low <= value <= high) or (name not in PHYSICAL and value <= 0):
        return "impossible"
    op, limit, _ = TARGETS[name]
    return "met" if (value >= limit if op == ">=" else value <= limit) else "missed"


def judge(figures: dict[str, float], bf16_host: bool = True, broken: dict | None = None) -> dict[str, bool | None]:
    """met (True) or missed (False) per target -- a figure that could not be measured, or that is
    physically impossible, is missed; None for a figure that is not a target on this host."""
    out = {}
    for name in TARGETS:
        s = status(name, figures.get(name, float("nan")), bf16_host, broken)
        out[name] = None if s == "reported" else s == "met"
    return out


def format_table(table: list[dict]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in table:
        line = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            line.append("-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(figures: dict[str, float], statuses: dict[str, str]) -> str:
    lines = []
    width = max(len(name) for name in TARGETS)
    for name, (op, limit, what) in TARGETS.items():
        value = figures.get(name, float("nan"))
        shown = {"met": "met", "reported": "reported"}.get(statuses.get(name, ""), statuses.get(name, "?").upper())
        lines.append(f"{name:{width}s} {value:9.3f}  (target {op} {limit:g})  {shown:10s}  {what}")
    return "\n".join(lines)


def format_machine(rates: dict) -> str:
    """The machine's measured rates, printed beside the figures they bound."""
    def num(key: str) -> str:  # whole GFLOP/s; two digits for the rate of an emulated bf16 matmul
        value = rates.get(key, float("nan"))
        return f"{value:.0f}" if value >= 10 else f"{value:.2g}"

    nan = float("nan")
    return (
        f"machine: memory read {rates.get('read_gbps', nan):.1f} GB/s, copy {rates.get('copy_gbps', nan):.1f} GB/s; "
        f"matmul fp32 {num('matmul_gflops')} GFLOP/s, bf16 {num('matmul_bf16_gflops')} GFLOP/s; "
        f"{rates.get('torch_threads', '?')} torch threads"
    )


def format_roofline(roof: dict) -> str:
    if not roof:
        return "(no roofline)"
    return "\n".join(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}" for k, v in roof.items())


def report(runs: list[Run], micro: dict, environment: dict, roofline: dict, target_image: str,
           config: dict) -> dict:
    """Everything a run writes as JSON. `targets` holds exactly the TARGETS figures (numbers);
    `targets_met` says met (true) or missed (false) for each; `targets_detail` the limits."""
    table = rows(runs)
    figures = target_figures(table, target_image, micro)
    bf16_host = bool(environment.get("bf16_matrix_instructions", True))
    broken = below_floor(table, target_image, roofline)
    met = judge(figures, bf16_host, broken)
    statuses = {name: status(name, figures[name], bf16_host, broken) for name in TARGETS}
    return {
        "environment": environment,
        "config": config,
        "table": table,
        "targets": figures,
        "targets_met": met,
        "targets_detail": {name: {"value": figures[name], "op": op, "limit": limit, "met": met[name],
                                  "status": statuses[name], "definition": what,
                                  **({"bounds": list(PHYSICAL.get(name, POSITIVE)[:2]),
                                      "why": broken.get(name, PHYSICAL.get(name, POSITIVE)[2])}
                                     if statuses[name] == "impossible" else {})}
                           for name, (op, limit, what) in TARGETS.items()},
        "micro": micro,
        "roofline": roofline,
        "runs": [{**asdict(r), "samples": [asdict(s) for s in r.samples]} for r in runs],
    }


def json_safe(obj):
    """JSON has no NaN: write null (numpy scalars as Python numbers)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj


def plot(data: dict, path: Path) -> None:
    """Output tokens/s and TTFT p50 against concurrency, one line per mode and image size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in data["table"]:
        series.setdefault((r["mode"], r["image"]), []).append(r)
    for (mode, image), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in rs]
        style = "--" if mode == BASELINE else ":" if mode.startswith("llama.cpp") else "-"
        label = f"{mode} {image}"
        if mode == BASELINE:  # sequential: draw it as a level across the concurrency axis
            x = [1, 16]
            rs = rs[:1] * 2
        ax1.plot(x, [r["tokens_per_s"] for r in rs], style, marker="o", label=label)
        ax2.plot(x, [r["ttft_p50_ms"] for r in rs], style, marker="o", label=label)
    ax1.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput", xscale="log", xticks=[1, 4, 8, 16])
    ax2.set(xlabel="concurrency", ylabel="TTFT p50 (ms)", title="time to first token", xscale="log",
            xticks=[1, 4, 8, 16])
    for ax in (ax1, ax2):
        ax.set_xticklabels(["1", "4", "8", "16"])
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    env = data.get("environment", {})
    fig.suptitle(f"qwen3vl-triton bench: {env.get('cores', '?')} cores, torch {env.get('torch', '?')}, "
                 f"transformers {env.get('transformers', '?')}, tritonserver {env.get('tritonserver', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, out_dir: Path, stamp: str) -> dict[str, Path]:
    """bench-<stamp>.json / .png, and the same as bench-latest.json / .png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"bench-{stamp}.json", "png": out_dir / f"bench-{stamp}.png"}
    paths["json"].write_text(json.dumps(json_safe(data), indent=2) + "\n")
    plot(data, paths["png"])
    for kind in ("json", "png"):
        latest = out_dir / f"bench-latest.{kind}"
        shutil.copyfile(paths[kind], latest)
        paths[f"latest_{kind}"] = latest
    return paths


def render_text(data: dict) -> str:
    env = data["environment"]
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    parts = [f"environment: {head}", "", format_table(data["table"]), "",
             format_machine(data.get("micro", {}).get("machine", {})),
             "targets:", format_targets(data["targets"], {k: v["status"] for k, v in data["targets_detail"].items()}),
             "",
             "roofline:", format_roofline(data.get("roofline", {}))]
    micro = {k: v for k, v in data.get("micro", {}).items() if not isinstance(v, (dict, list))}
    if micro:
        parts += ["", "micro-benchmarks:", format_roofline(micro)]
    return "\n".join(parts)
