"""What routing adds to a request in qwen3vl_disagg: the conversation key and the choice of a
language server (`LanguagePool.choose`, `started`, `finished`), per request, on this machine.

    python -m load_tests.bench_routing [--servers 3] [--requests 20000] [--image-kib 64]

The load figures come from a background thread (one `op=load` call per server every 0.25 s while
requests come), never on a request's path; here the members answer those calls in-process, so
the figures are the routing's own CPU time. Prints the machine's CPU facts beside them.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import statistics
import time

from qwen3vl_triton.transfer.pool import LanguagePool, conversation_key


class _Member:
    def __init__(self, url):
        self.url = url

    def load(self):
        return (3, 1200, False)

    def close(self, cancel=False):
        pass


def cpu_facts() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("?", "x86_64", ""):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}; {os.cpu_count()} CPUs; {' '.join(shown) or 'no AVX2'}; load average {load:.1f}"


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    return {"mean": statistics.fmean(values), "p50": values[len(values) // 2], "p99": values[int(len(values) * 0.99)]}


def measure(servers: int = 3, requests: int = 20000, image_kib: int = 64) -> dict:
    """Microseconds per request (mean, p50, p99) of the conversation key, of the choice (choose +
    started + finished), and of both (`routing`), over `requests` requests among 64 conversations,
    each with an image of `image_kib` KiB in its first message."""
    pool = LanguagePool([f"10.0.0.{i}:8001" for i in range(servers)],
                        client_factory=lambda url, _: _Member(url))
    image = "data:image/png;base64," + base64.b64encode(os.urandom(image_kib * 1024)).decode()
    conversations = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                   {"type": "text", "text": f"Conversation {i}"}]}]
                     for i in range(64)]
    key_us, choose_us = [], []
    try:
        pool.choose(b"warm")
        for i in range(requests):
            t0 = time.perf_counter()
            key = conversation_key(messages=conversations[i % len(conversations)])
            t1 = time.perf_counter()
            member = pool.choose(key)
            pool.started(member)
            pool.finished(member)
            t2 = time.perf_counter()
            key_us.append((t1 - t0) * 1e6)
            choose_us.append((t2 - t1) * 1e6)
    finally:
        pool.close()
    return {"servers": servers, "requests": requests, "image_kib": image_kib, "key_us": _stats(key_us),
            "choose_us": _stats(choose_us), "routing_us": _stats([a + b for a, b in zip(key_us, choose_us)])}


def format_row(name: str, stats: dict) -> str:
    return f"{name:<34} mean {stats['mean']:8.1f} us   p50 {stats['p50']:8.1f} us   p99 {stats['p99']:8.1f} us"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--image-kib", type=int, default=64, help="the image in each conversation's first message")
    args = ap.parse_args(argv)
    figures = measure(args.servers, args.requests, args.image_kib)
    print(f"cpu: {cpu_facts()}")
    print(f"{args.requests} requests, {args.servers} language servers, a {args.image_kib} KiB image per conversation")
    print(format_row("conversation key", figures["key_us"]))
    print(format_row("choose + started + finished", figures["choose_us"]))
    print(format_row("routing, per request", figures["routing_us"]))
    ok = figures["routing_us"]["mean"] < 1000
    print(f"routing overhead {'under' if ok else 'OVER'} 1 ms per request")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
