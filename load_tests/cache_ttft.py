"""The vision encoder's image cache, measured: TTFT of a conversation's first turn (its image
encoded by the tower) against its second turn (the same image again, with the first answer in
the conversation: the image's rows come from the cache), through the OpenAI endpoint.

    python -m load_tests.cache_ttft                      # starts a server on the small profile
    python -m load_tests.cache_ttft --openai-url 127.0.0.1:9000 --metrics-url 127.0.0.1:8002

Each round uses a new image (seeded), so every first turn is a miss; rounds alternate nothing
else. Prints the TTFT of both turns (median and each round), the cache counters' moves, and the
turn-2 prompt length (longer: it holds turn 1 and its answer).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def counter(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M))


def ttft(client, messages, max_tokens: int) -> tuple[float, str, int]:
    """Seconds to the first content chunk, the whole text, the prompt tokens."""
    t0 = time.perf_counter()
    first, parts, usage = None, [], None
    for chunk in client.chat.completions.create(model="qwen3vl", messages=messages, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return (first or time.perf_counter()) - t0, "".join(parts), usage.prompt_tokens


def measure(openai_url: str, metrics_url: str, rounds: int, size: int, max_tokens: int) -> dict:
    import openai

    from client import Conversation
    from load_tests.workload import make_image

    out = {"first": [], "second": [], "prompt_tokens": []}
    hits0, misses0 = (counter(metrics_url, f"qwen3vl_vision_cache_{k}_total") for k in ("hits", "misses"))
    with openai.OpenAI(base_url=f"http://{openai_url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        ttft(client, Conversation().user("Warm up.", [make_image(size, size, 999)]).messages, 2)  # not counted
        for r in range(rounds + 1):
            conv = Conversation().user("Describe this image in short.", [make_image(size, size, 1000 + r)])
            t1, answer, p1 = ttft(client, conv.messages, max_tokens)
            conv.assistant(answer).user("What stands out in it?")
            t2, _, p2 = ttft(client, conv.messages, max_tokens)
            if r == 0:
                hits0, misses0 = (counter(metrics_url, f"qwen3vl_vision_cache_{k}_total") for k in ("hits", "misses"))
                continue  # the first round warms the new prompt lengths
            out["first"].append(t1)
            out["second"].append(t2)
            out["prompt_tokens"].append((p1, p2))
    out["hits"] = counter(metrics_url, "qwen3vl_vision_cache_hits_total") - hits0
    out["misses"] = counter(metrics_url, "qwen3vl_vision_cache_misses_total") - misses0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.cache_ttft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--openai-url", help="HOST:PORT of a running OpenAI endpoint (default: start a server)")
    ap.add_argument("--metrics-url", help="HOST:PORT of its tritonserver's metrics")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small"),
                    help="checkpoint of the server started here (default: the small profile, built if missing)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    servers = []
    try:
        if args.openai_url is None:
            from qwen3vl_triton.model.tiny import ensure_checkpoint
            from qwen3vl_triton.serve.cpu_engine import render_prepared
            from qwen3vl_triton.serve.repository import Settings
            from qwen3vl_triton.serve.server import OpenAIServer, Ports, TritonServer, free_ports

            checkpoint = Path(args.checkpoint)
            if not checkpoint.is_dir():
                checkpoint = ensure_checkpoint(checkpoint, profile="small")
            build = ROOT / "build" / "cache-ttft"
            settings = Settings()
            repo, _ = render_prepared(checkpoint, build / "repository", build, settings, topology="single")
            http, grpc, metrics, port = free_ports(4)
            triton = TritonServer(
                repo, Ports(http, grpc, metrics), build_dir=build, log_file=build / "tritonserver.log"
            )
            servers.append(triton.start(timeout=900))
            servers.append(OpenAIServer(triton.grpc_url, "127.0.0.1", port, settings,
                                        log_file=build / "openai.log").start())
            args.openai_url, args.metrics_url = f"127.0.0.1:{port}", f"127.0.0.1:{metrics}"
        r = measure(args.openai_url, args.metrics_url, args.rounds, args.size, args.max_tokens)
    finally:
        for s in reversed(servers):
            s.stop()
    ms = lambda xs: " ".join(f"{x * 1000:.0f}" for x in xs)  # noqa: E731
    print(f"image {args.size}x{args.size}, {args.rounds} rounds, prompt tokens turn 1 / turn 2: "
          f"{r['prompt_tokens'][0][0]} / {r['prompt_tokens'][0][1]}")
    print(f"TTFT turn 1 (image encoded):   median {statistics.median(r['first']) * 1000:.0f} ms  ({ms(r['first'])})")
    print(f"TTFT turn 2 (image from cache): median {statistics.median(r['second']) * 1000:.0f} ms  "
          f"({ms(r['second'])})")
    print(f"cache: {r['hits']:.0f} hits, {r['misses']:.0f} misses over the measured rounds")
    return 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
