"""What serving adds to a token at concurrency 1.

    python -m load_tests.serving_cost checkpoints/small [--requests 4] [--tokens 128] [--dtype float32]

Served inter-token latency p50 -- `tensorrt_llm` called directly over a gRPC stream, and the
`qwen3vl` ensemble -- beside the engine's own batch-1 decode step and its inter-token latency in
this process, and each one's time to the first token (same engine class, same request: the bench's
448x448 image and prompt), measured in turns so a busy machine weighs on all of them.
`serving_ms_per_token` = served ITL p50 minus the in-process step p50. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def gaps_ms(times: list[float]) -> list[float]:
    return [1e3 * (b - a) for a, b in zip(times, times[1:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-server", action="store_true", help="in-process figures only")
    ap.add_argument("--profile-seconds", type=float, default=0,
                    help="record the tensorrt_llm stub with py-spy for this long during direct requests")
    args = ap.parse_args(argv)

    from load_tests import bench_load as load
    from load_tests.bench import SERVER_SETTINGS, start_server
    from load_tests.bench_micro import machine_rates
    from qwen3vl_triton.arrays import numpy_dtype
    from qwen3vl_triton.contract import MODEL, LLMRequest
    from qwen3vl_triton.engine.engine import Engine
    from qwen3vl_triton.engine.scheduler import Request
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.serve.cpu_engine import engine_threads, prepare
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.text.preprocess import Preprocessor

    spec = ModelSpec.load(args.checkpoint)  # first: a missing checkpoint is one line, at once
    rates = machine_rates()
    print("machine: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    item = load.workload((448, 448), 1)[0]
    p = Preprocessor(spec, max_images=2)(item.prompt, [item.image])
    float_dtype = "float32" if args.dtype in ("q8_0", "q4_k") else args.dtype  # the vision tower's and table's
    r = VisionEncoder(spec, dtype=float_dtype).encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
    table = r.prompt_embedding_table.float().numpy().astype(numpy_dtype(float_dtype))
    llm = LLMRequest(p.input_ids.astype(np.int32), args.tokens, end_id=spec.end_id, table=table,
                     mrope_cos_sin=r.mrope_rotary_cos_sin, mrope_delta=r.mrope_position_deltas, streaming=True)

    steps: list = []
    # the served engine: the runner cpu_runner=auto chooses, on the weights the server loads
    served = prepare(spec, Settings(**{**SERVER_SETTINGS, "dtype": args.dtype}), "cpu", ROOT / "build")
    engine = Engine(spec, dtype=args.dtype, max_batch=SERVER_SETTINGS["engine_max_batch"],
                    max_seq_len=SERVER_SETTINGS["max_seq_len"], max_output_len=SERVER_SETTINGS["max_output_len"],
                    on_step=steps.append, runner=served.runner, gguf=served.gguf,
                    **dict(zip(("threads", "shared_threads"), engine_threads(served.runner, os.cpu_count() or 1))))
    print(f"engine: {served.describe()}")

    def in_process() -> list[float]:
        times, done = [], threading.Event()

        def on_tokens(tokens, finish, error):
            times.append(time.perf_counter())
            if finish:
                done.set()

        engine.submit(Request(p.input_ids, args.tokens, end_id=spec.end_id, table=r.prompt_embedding_table,
                              mrope_cos_sin=r.mrope_rotary_cos_sin, mrope_delta=r.mrope_position_deltas,
                              on_tokens=on_tokens))
        done.wait(300)
        return times

    kinds = {"in_process": in_process}
    server = None
    if not args.no_server:
        server = start_server(args.checkpoint, "single", "serving-cost", dtype=args.dtype)
        direct, ensemble = load.OpenStream(server.grpc_url), load.OpenStream(server.grpc_url)
        kinds["direct"] = lambda: direct.stream(MODEL, llm.arrays(), timeout=120)
        kinds["ensemble"] = lambda: ensemble.generate(item.prompt, [item.image], args.tokens, timeout=120)
    itl: dict[str, list[float]] = {k: [] for k in kinds}
    ttft: dict[str, list[float]] = {k: [] for k in kinds}
    tokens: dict[str, list[int]] = {k: [] for k in kinds}
    try:
        for i in range(args.requests + 1):
            for name, fn in kinds.items():
                if name == "direct" and i == 1 and args.profile_seconds:
                    profile(server, args.profile_seconds)
                t0 = time.perf_counter()
                times = fn()
                if i:  # the first round warms up
                    ttft[name].append(1e3 * (times[0] - t0))
                    itl[name] += gaps_ms(times)
                    tokens[name].append(len(times))
    finally:
        engine.shutdown()
        if server is not None:
            direct.close()
            ensemble.close()
            server.stop()
    step_ms = [1e3 * s.seconds for s in steps if s.sequences == 1 and s.decode_tokens == 1]
    step = statistics.median(step_ms)
    print(f"{args.checkpoint.name}, {args.dtype}, {args.requests} requests of {args.tokens} tokens, concurrency 1")
    print(f"engine batch-1 decode step in process: p50 {step:.2f} ms (p10 {np.percentile(step_ms, 10):.2f}, "
          f"p90 {np.percentile(step_ms, 90):.2f})")
    for name in kinds:
        v = itl[name]
        print(f"ITL {name:10}: p50 {statistics.median(v):6.2f} ms  p90 {np.percentile(v, 90):6.2f}  "
              f"serving ms/token {statistics.median(v) - step:5.2f}  TTFT p50 {statistics.median(ttft[name]):7.2f} ms  "
              f"tokens/request {tokens[name]}")
    return 0


def profile(server, seconds: float) -> None:
    """py-spy record of the tensorrt_llm stub (py-spy must be installed; it is not a dependency)."""
    import subprocess

    stub = next(c for c in server.children() if "tensorrt_llm" in " ".join(c.cmdline()))
    out = ROOT / "build" / "serving-cost" / "tensorrt_llm.speedscope.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.Popen(["py-spy", "record", "--pid", str(stub.pid), "--duration", str(int(seconds)), "--threads",
                      "--idle", "--format", "speedscope", "--output", str(out), "--nonblocking"])
    print(f"py-spy: recording {stub.pid} for {seconds:.0f} s into {out}")


if __name__ == "__main__":
    from load_tests import run_tool

    raise SystemExit(run_tool(main))
