"""A conversation's second turn across the split, measured: the rows it moves and its time to the
first token, with the language server's row cache on and off, in one run.

    python -m load_tests.disagg_turns                        # small profile, 448x448 images
    python -m load_tests.disagg_turns --checkpoint DIR --rounds 5

Starts one encoder server and two language servers on 127.0.0.1 (serve/cluster.py's launcher
processes, the cluster's shared settings): `rows` with the row cache on (the default), `plain`
with it off (`language_row_cache_bytes=0`, every row sent every turn, as before it existed). Both
keep the engine's prefix KV cache. Each round is a new conversation with a new image (seeded):
turn 1 (image + question), then turn 2 (turn 1, its answer, a follow-up), sent by the package's
sender (`Disaggregated`: encode, transfer, generate), once to each server, the order alternating
from round to round so host load falls on both alike. Prints per round and the medians: TTFT of
both turns, the table rows each turn moved, the row-cache counter, and the machine's rates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {"rows": [], "plain": ["language_row_cache_bytes=0"]}  # --set of each language server


def turn(d, messages, max_tokens: int) -> tuple[float, str, int]:
    """Seconds to the first text piece, the whole text, the table rows this turn moved."""
    rows = d.stats.rows
    t0 = time.perf_counter()
    first, parts = None, []
    for piece in d.generate(None, messages=messages, max_tokens=max_tokens):
        if piece and first is None:
            first = time.perf_counter()
        parts.append(piece)
    return (first or time.perf_counter()) - t0, "".join(parts), d.stats.rows - rows


def measure(encoder_url: str, language_urls: dict[str, str], metrics_urls: dict[str, str], rounds: int, size: int,
            max_tokens: int) -> dict:
    from client import Conversation
    from load_tests.cache_ttft import counter
    from load_tests.workload import make_image
    from qwen3vl_triton.transfer.sender import Disaggregated

    out = {name: {"turn1": [], "turn2": [], "rows1": [], "rows2": []} for name in language_urls}
    senders = {name: Disaggregated(encoder_url, url) for name, url in language_urls.items()}
    skipped = "qwen3vl_language_rows_skipped_total"
    try:
        for r in range(rounds + 1):  # round 0 warms the prompt lengths: not counted
            image = make_image(size, size, 2000 + r)
            order = list(senders) if r % 2 == 0 else list(reversed(senders))
            if r == 1:
                before = {name: counter(metrics_urls[name], skipped) for name in senders}
            for name in order:
                conv = Conversation().user("Describe this image in short.", [image])
                t1, answer, rows1 = turn(senders[name], conv.messages, max_tokens)
                conv.assistant(answer).user("What stands out in it?")
                t2, _, rows2 = turn(senders[name], conv.messages, max_tokens)
                if r:
                    for key, value in (("turn1", t1), ("turn2", t2), ("rows1", rows1), ("rows2", rows2)):
                        out[name][key].append(value)
        for name in senders:
            out[name]["skipped"] = counter(metrics_urls[name], skipped) - before[name]
    finally:
        for d in senders.values():
            d.close()
    return out


def check(result: dict) -> list[str]:
    """What no correct run shows: a turn faster than nothing, rows moved by a turn-2 whose rows the
    server held, a turn 1 that moved no rows."""
    problems = []
    for name, r in result.items():
        if any(t <= 0 for t in r["turn1"] + r["turn2"]):
            problems.append(f"{name}: a time to first token <= 0")
        if any(n <= 0 for n in r["rows1"]):
            problems.append(f"{name}: a turn 1 moved no rows (its image is new)")
    if "rows" in result and any(n != 0 for n in result["rows"]["rows2"]):
        problems.append(f"rows: a turn 2 moved rows {result['rows']['rows2']} (the server held its image)")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.disagg_turns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small"),
                    help="checkpoint of the servers (default: the small profile, built if missing)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "disagg-turns"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds each server has to be ready")
    args = ap.parse_args(argv)

    from load_tests.bench_micro import machine_rates
    from load_tests.bench_report import cpu_features, format_machine
    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.serve import cluster
    from qwen3vl_triton.serve.launcher import admin_key
    from qwen3vl_triton.serve.server import free_ports

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        checkpoint = ensure_checkpoint(checkpoint, profile="small")
    build = Path(args.build_dir).resolve()
    ports = iter(free_ports(3 * (1 + len(CONFIGS))))
    members = {name: cluster.Member("language", f"language-{name}", next(ports), next(ports), next(ports))
               for name in CONFIGS}
    members["encoder"] = cluster.Member("encoder", "encoder", next(ports), next(ports), next(ports))
    launch = SimpleNamespace(build_dir=str(build), admin_key=admin_key(None, build, "turns", 0)[0],
                             timeout=args.timeout, checkpoint=str(checkpoint), set=[])
    try:
        deadline = time.monotonic() + args.timeout
        for name, m in members.items():
            cluster.start(m, cluster.launcher_command(m, launch, CONFIGS.get(name, [])), build / f"{m.name}.log")
        for m in members.values():
            print(f"waiting for {m.name} ...", flush=True)
            cluster.wait_ready(m, deadline)
        result = measure(f"127.0.0.1:{members['encoder'].grpc}",
                         {name: f"127.0.0.1:{members[name].grpc}" for name in CONFIGS},
                         {name: f"127.0.0.1:{members[name].metrics}" for name in CONFIGS},
                         args.rounds, args.size, args.max_tokens)
    finally:
        cluster.stop_all(list(members.values()))

    ms = lambda xs: " ".join(f"{x * 1000:.0f}" for x in xs)  # noqa: E731
    print(f"checkpoint {checkpoint.name}, image {args.size}x{args.size}, {args.rounds} rounds, "
          f"{args.max_tokens} tokens per turn")
    for name, r in result.items():
        print(f"{name:>5} (row cache {'on' if name == 'rows' else 'off'}): TTFT turn 1 median "
              f"{statistics.median(r['turn1']) * 1000:.0f} ms ({ms(r['turn1'])}), turn 2 median "
              f"{statistics.median(r['turn2']) * 1000:.0f} ms ({ms(r['turn2'])}); rows moved turn 1 {r['rows1']}, "
              f"turn 2 {r['rows2']}; qwen3vl_language_rows_skipped_total +{r['skipped']:.0f}")
    if len(result) == 2:
        ratio = statistics.median(result["rows"]["turn2"]) / statistics.median(result["plain"]["turn2"])
        print(f"turn-2 TTFT, row cache on / off: {ratio:.2f}")
    features = cpu_features()
    print(f"{features['cpu_model']}; {' '.join(features['cpu_flags'])}")
    print(format_machine(machine_rates()))
    problems = check(result)
    for p in problems:
        print(f"impossible: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
