"""make demo: build the tiny checkpoint if missing, start the server, stream a caption, stop.

The tiny checkpoint has random weights, so the text is gibberish -- but it is exactly what
transformers generates from the same weights, served through Triton end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qwen3vl_triton.model.tiny import ensure_checkpoint
from qwen3vl_triton.serve.cpu_engine import render_prepared
from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.serve.server import Ports, ServerError, TritonServer, free_ports

from . import SAMPLE_IMAGE as SAMPLE
from .api import Client, ClientError, GenerationStats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the tiny one, built on first use)")
    ap.add_argument("--image", default=str(SAMPLE))
    ap.add_argument("--prompt", default="Describe this image in short.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--build-dir", default="build")
    args = ap.parse_args(argv)

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(Path("checkpoints/tiny"))
    build = Path(args.build_dir).resolve()
    # the default engine (cpu_runner=auto: the ggml runner on the tiny checkpoint), its weights converted first
    repo, engine = render_prepared(checkpoint, build / "repository" / "demo", build, Settings(), topology="single")
    print(f"engine: {engine.describe()}", flush=True)
    server = TritonServer(repo, Ports(*free_ports(3)), build_dir=build, log_file=build / "tritonserver-demo.log")
    print(f"starting tritonserver (log: {server.log_file}) ...", flush=True)
    t0 = time.time()
    try:
        server.start(timeout=600)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"ready in {time.time() - t0:.1f}s: grpc {server.grpc_url}, http {server.http_url}")
        print(f"image: {args.image}\nprompt: {args.prompt}\n--- streamed over gRPC ---", flush=True)
        stats = GenerationStats()
        with Client(server.grpc_url, "grpc") as client:
            for piece in client.generate(args.prompt, [Path(args.image).read_bytes()], args.max_tokens, stats=stats):
                print(piece, end="", flush=True)
        print(f"\n--- {stats.pieces} pieces, first after {stats.ttft * 1000:.0f} ms, total {stats.total:.2f}s ---")
        if not args.checkpoint:
            print("(the tiny checkpoint's weights are random: the text is gibberish by design, token for token "
                  "what transformers generates from the same weights)")
        return 0
    except ClientError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("server stopped")


if __name__ == "__main__":
    sys.exit(main())
