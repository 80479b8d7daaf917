"""Served decode (and lone prefill) on 1 or 2 engine threads: which `decode_threads` and `prefill_threads` to take.

    python -m load_tests.ggml_threads [--checkpoint checkpoints/small] [--threads 1 2] [--rounds 3]
    python -m load_tests.ggml_threads --threads 1 1 --prefill-threads 1 2 --no-c8   # a lone prefill on 1 or 2

One server per thread count (the bench's settings, `decode_threads=N`, the encoder cache off), all
up at once and measured in turns, so other work on the host weighs on each alike: at concurrency
1, request by request in turn on the same item; at concurrency 8, closed-loop rounds in turn
(A, B, A, B, ...). Every request sends an image no other request sent. Prints ITL and TTFT p50/p90
and output tokens/s per thread count, with the host's load average beside them. Nothing is
asserted: the figures are for the choice of `engine.runner.DECODE_THREADS`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="default: checkpoints/small (built when missing)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="decode_threads of each server")
    ap.add_argument("--prefill-threads", type=int, nargs="+", default=None,
                    help="prefill_threads of each server (one per --threads entry; default: every core)")
    ap.add_argument("--no-c8", action="store_true", help="concurrency 1 only")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each concurrency per thread count")
    ap.add_argument("--single", type=int, default=2, help="requests per round at concurrency 1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--llamacpp", action="store_true",
                    help="llama-server (the bench's peer, f32 GGUF) instead of the served stack, same threads")
    args = ap.parse_args(argv)

    from load_tests import bench_load as load
    from load_tests.bench import start_server
    from load_tests.bench_report import Run, row
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.serve.cpu_engine import engine_threads
    from qwen3vl_triton.text.preprocess import Preprocessor

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "small",
                                                                                 "small")
    size = (448, 448)
    pre = Preprocessor(ModelSpec.load(checkpoint), max_images=2)
    seeds = iter(range(10_000, 10**9))  # every request its own image

    def fresh(n):
        items = [load.Item(load.PROMPTS[i % len(load.PROMPTS)], load.seeded_image(*size, seed=next(seeds)), size)
                 for i in range(n)]
        lengths.update({it: load.input_tokens(pre, it) for it in items})
        return items

    lengths: dict = {}
    servers = {}
    try:
        prefill = args.prefill_threads or [0] * len(args.threads)
        if args.llamacpp:
            from builders.llamacpp import build, convert
            from load_tests import bench_llamacpp as peer

            binary, files = build.ensure_server(), convert.ensure_gguf(checkpoint, "f32")
        for t, pt in zip(args.threads, prefill):
            pt, t = engine_threads("ggml", os.cpu_count() or 1, pt, t)
            key = f"{t}/{pt}"  # decode / prefill threads
            if args.llamacpp:
                servers[key] = peer.LlamaServer(binary, *files, ROOT / "build" / "threads" / f"llamacpp-{t}-{pt}.log",
                                                threads=t, threads_batch=pt).start()
            else:
                servers[key] = start_server(checkpoint, "single", f"threads-{t}-{pt}", dtype=args.dtype,
                                            decode_threads=t, prefill_threads=pt, vision_cache_bytes=0,
                                            pixel_cache_bytes=0)

        def open_session(server):
            return peer.LlamaCppSession(server.address) if args.llamacpp else load.EnsembleSession(server.grpc_url,
                                                                                                   lengths)

        single = {t: Run(f"threads={t}", 1, "448x448", args.max_tokens, 0.0) for t in servers}
        loops = {t: [] for t in servers}
        load_avg = []
        sessions = {t: open_session(s) for t, s in servers.items()}
        warm = load.warmup_request(size)
        for session in sessions.values():
            session.request(warm, 4)
        for r in range(args.rounds):
            load_avg.append(os.getloadavg()[0])
            for item in fresh(args.single):
                for t, session in sessions.items():
                    t0 = time.perf_counter()
                    single[t].samples.append(session.request(item, args.max_tokens))
                    single[t].seconds += time.perf_counter() - t0
            for t, s in servers.items():
                if args.no_c8:
                    break
                factory = lambda s=s: open_session(s)  # noqa: E731
                loops[t].append(load.closed_loop(factory, fresh(8), 8, 1, args.max_tokens, 4, f"threads={t}",
                                                 log=lambda *_: None, warmup_item=warm))
            print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        for session in sessions.values():
            session.close()
    finally:
        for s in servers.values():
            s.stop()
    who = "llama-server" if args.llamacpp else "served"
    print(f"\n{who}, {checkpoint.name}, {args.dtype}, {args.max_tokens} output tokens, 448x448 images; load average "
          f"{min(load_avg):.1f}-{max(load_avg):.1f} (1 min) over {os.cpu_count()} cores")
    print("threads: decode/prefill")
    print(f"{'threads':>7} {'conc':>4} {'reqs':>4} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p90':>8} {'ms/tok':>7} "
          f"{'tok/s':>7}")
    for t in servers:
        c1 = row(single[t], None)
        print(f"{t:>7} {1:>4} {c1['requests']:>4} {c1['ttft_p50_ms']:>9.1f} {c1['itl_p50_ms']:>8.2f} "
              f"{c1['itl_p90_ms']:>8.2f} {c1['decode_ms_p50']:>7.2f} {c1['tokens_per_s']:>7.1f}")
        if args.no_c8:
            continue
        merged = Run(f"threads={t}", 8, "448x448", args.max_tokens, sum(r.seconds for r in loops[t]),
                     [s for r in loops[t] for s in r.samples])
        c8 = row(merged, None)
        per_round = [r.tokens / r.seconds for r in loops[t]]
        print(f"{t:>7} {8:>4} {c8['requests']:>4} {c8['ttft_p50_ms']:>9.1f} {c8['itl_p50_ms']:>8.2f} "
              f"{c8['itl_p90_ms']:>8.2f} {c8['decode_ms_p50']:>7.2f} {c8['tokens_per_s']:>7.1f}   rounds: "
              + ", ".join(f"{x:.1f}" for x in per_round) + f" (median {statistics.median(per_round):.1f})")
    return 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
