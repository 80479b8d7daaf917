"""`make bench-cluster`: the loopback cluster (2 encoder + 3 language servers) against one encoder +
one language server, in the same run, on the same workload, with the machine's rates beside it.

    python -m load_tests.bench_cluster                 # full size
    python -m load_tests.bench_cluster --quick         # make bench-cluster QUICK=1
    python -m load_tests.bench_cluster --checkpoint DIR --encoders 2 --languages 3 --concurrency 6

Both sides are loopback clusters of qwen3vl_triton/serve/cluster.py (the code of `make cluster`;
the pair is the same with one encoder and one language server), started side by side on free ports
of 127.0.0.1, on the same checkpoint (default: the tiny one) with the same settings: the cluster's
(deploy/k8s/base/serving.env), then the bench's (the encoder's image cache and the engine's prefix
cache off: no side computes less because the other filled a cache), then each --set. A side whose
servers are not all ready within --timeout is stopped and started once more (said in the output
and under `start_retries` in the JSON). Or, with --cluster-json / --pair-json, servers already
running (the cluster.json `make cluster` writes).

The workload is load_tests/workload.py's seeded mix (a third text only, a third one image, a third
two images), the same requests, images and max_tokens on both sides: qwen3vl_disagg over gRPC
streams, closed loop (bench_load.closed_loop), `concurrency` workers, each on one encoder server of
its side in turn. Both sides first warm up on every case of the workload; then the measured rounds
alternate (cluster then pair, pair then cluster, ...), each round the same requests on both, so
other work on this shared host weighs on both alike.

Prints and writes load_tests/reports/bench-cluster-<stamp>.json and bench-cluster-latest.json:
per side requests/s, output tokens/s, TTFT p50 and ITL p50 (a request's mean time per token after
the first, p50 over the requests, as `make bench` defines it; the gaps' p50 beside it) and the
ratios cluster/pair; the sequences each language server of the cluster started in the measured
rounds (load_tests/spread.py); whether both sides generated the same tokens for the same requests
(greedy); the routing's own cost per request (load_tests/bench_routing.py: the conversation key and
the choice of a language server, in process; target under 1 ms); the machine's rates (memory read
and copy GB/s, fp32/bf16 matmul GFLOP/s: bench_micro.machine_rates) and CPU features; the load
average and other processes' share of the CPU while it ran. On 2 cores no gain is expected: the
cluster's five servers share the cores the pair has; what the run shows is what routing costs.

Exit 1 when a figure is physically impossible (a time or a rate that is not positive, a request
with more tokens than it asked for or none, a token before its request began or after its round
ended), when a request failed, or when routing costs 1 ms per request or more.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `client` and `tests.oracle` import from the checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from load_tests import bench_routing, spread  # noqa: E402
from load_tests.bench_load import closed_loop  # noqa: E402
from load_tests.bench_report import Run, Sample, cpu_features, format_machine, json_safe, percentile, row  # noqa: E402
from load_tests.workload import Case, Workload, pixel_limits  # noqa: E402

REPORTS = ROOT / "load_tests" / "reports"
MODEL = "qwen3vl_disagg"
CLUSTER, PAIR = "cluster", "pair"
# no side computes less because a cache holds what the other side's requests computed
BENCH_SETS = ("vision_cache_bytes=0", "kv_cache_bytes=0")
ROUTING_LIMIT_MS = 1.0


@dataclass
class Config:
    encoders: int = 2
    languages: int = 3
    concurrency: int = 6
    rounds: int = 4  # measured rounds per side, alternating
    requests: int = 24  # requests per round
    max_tokens: int = 64
    image_sizes: int = 4
    seed: int = 0
    warmup_tokens: int = 4
    routing_requests: int = 20000

    @classmethod
    def make(cls, quick: bool, **overrides) -> "Config":
        base = cls(rounds=2, requests=12, max_tokens=32, routing_requests=5000) if quick else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


def log(msg: str) -> None:
    print(msg, flush=True)


# -- a side's requests ----------------------------------------------------------------------------
class DisaggSession:
    """One worker's gRPC stream to one encoder server's qwen3vl_disagg; a response's `output_ids`
    are its tokens, each timed by the response's arrival. Every request's token ids go to
    `outputs` (case -> the distinct id sequences it got)."""

    def __init__(self, url: str, outputs: dict, lock: threading.Lock, timeout: float = 300):
        from qwen3vl_triton.clients.grpc_stream import GrpcStream

        self.stream = GrpcStream(url, timeout, stream_timeout=timeout)
        self.outputs, self.lock = outputs, lock

    def request(self, case: Case, max_tokens: int) -> Sample:
        from qwen3vl_triton.clients.qwen3vl import Qwen3VLRequest, Qwen3VLResponse

        inputs = Qwen3VLRequest(case.prompt, list(case.images), max_tokens, stream=True).grpc_inputs()
        t0 = time.perf_counter()
        times, ids, prompt = [], [], 0
        for result in self.stream.request(MODEL, inputs):
            r = Qwen3VLResponse.from_result(result)
            if r is None or not r.tokens:
                continue
            now = time.perf_counter() - t0
            times.extend([now] * r.tokens)
            ids.extend(int(i) for i in r.output_ids.reshape(-1))
            prompt = r.prompt_tokens or prompt
        with self.lock:
            self.outputs.setdefault(case, set()).add(tuple(ids))
        return Sample(times[0] if times else float("nan"), times, prompt)

    def close(self):
        self.stream.close()


@dataclass
class Side:
    """A topology under load: its servers (cluster.json's objects) and what it measured."""

    name: str
    servers: list[dict]
    run: Run | None = None
    round_seconds: list[float] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: dict[str, float] = field(default_factory=dict)  # sequences each language server started

    @property
    def urls(self) -> list[str]:
        return [f"127.0.0.1:{s['grpc']}" for s in self.servers if s["role"] == "encoder"]

    def count(self, role: str) -> int:
        return sum(1 for s in self.servers if s["role"] == role)

    def factory(self):
        """A session per worker, on the side's encoder servers in turn."""
        turn = itertools.count()
        return lambda: DisaggSession(self.urls[next(turn) % len(self.urls)], self.outputs, self.lock)


def rounds_of(workload: Workload, cfg: Config) -> list[list[Case]]:
    """The measured rounds' requests, the same for both sides: seeded picks from the workload."""
    rng = random.Random(cfg.seed)
    return [[workload.pick(rng) for _ in range(cfg.requests)] for _ in range(cfg.rounds)]


def sample_problems(side: str, run: Run, max_tokens: int) -> list[str]:
    """What no real request can do: get more tokens than it asked for or none, a token before it
    began or out of order, a request that lasted longer than its round."""
    out = []
    for i, s in enumerate(run.samples):
        t = s.token_times
        if not t:
            out.append(f"{side}: request {i} got no token")
        elif s.tokens > max_tokens:
            out.append(f"{side}: request {i} got {s.tokens} tokens, more than the {max_tokens} it asked for")
        elif not (t[0] > 0 and all(b >= a for a, b in zip(t, t[1:]))):
            out.append(f"{side}: request {i}'s token times are not positive and in order ({t[0]:.6f} s first)")
        elif t[-1] > run.seconds:
            out.append(f"{side}: request {i} ended {t[-1]:.3f} s after it began, past its round's {run.seconds:.3f} s")
    if run.seconds <= 0:
        out.append(f"{side}: a round took {run.seconds} s")
    return out


def measure(sides: dict[str, Side], workload: Workload, cfg: Config) -> list[str]:
    """Warm both sides up on every case, then the measured rounds, alternating which side goes
    first; returns the physically impossible samples found (empty: none)."""
    for side in sides.values():  # every case once, on every worker's encoder server: not measured
        closed_loop(side.factory(), list(workload.cases), min(cfg.concurrency, len(workload.cases)), 0,
                    cfg.warmup_tokens, 0, f"{side.name} warm-up", log, image="mix")
        side.outputs.clear()
        side.run = Run(side.name, cfg.concurrency, "mix", cfg.max_tokens, 0.0)
        side.started = dict.fromkeys(spread.sequences_started(side.servers), 0.0)
    problems: list[str] = []
    for k, work in enumerate(rounds_of(workload, cfg)):
        for side in (list(sides.values()) if k % 2 == 0 else list(sides.values())[::-1]):
            before = spread.sequences_started(side.servers)
            run = closed_loop(side.factory(), work, cfg.concurrency, 0, cfg.max_tokens, 0,
                              f"{side.name} round {k + 1}", log, image="mix")
            after = spread.sequences_started(side.servers)
            for name in after:
                side.started[name] += after[name] - before.get(name, 0.0)
            problems += sample_problems(side.name, run, cfg.max_tokens)
            side.round_seconds.append(run.seconds)
            side.run.seconds += run.seconds
            side.run.samples += run.samples
    return problems


# -- the report -----------------------------------------------------------------------------------
RATIOS = {  # name -> the row's figure whose cluster/pair ratio it is
    "requests_per_s": "requests_per_s",
    "tokens_per_s": "tokens_per_s",
    "ttft_p50": "ttft_p50_ms",
    "itl_p50": "decode_ms_p50",
}


def side_row(side: Side) -> dict:
    r = row(side.run, None)
    r.pop("ratio", None)
    gaps = [g for s in side.run.samples for g in s.inter_token]
    return {**r, "encoders": side.count("encoder"), "languages": side.count("language"),
            "tokens": side.run.tokens, "rounds": len(side.round_seconds), "round_seconds": side.round_seconds,
            "itl_gap_p50_ms": 1e3 * percentile(gaps, 50)}


def same_outputs(sides: dict[str, Side]) -> dict:
    """Greedy: every case's token ids the same wherever and whenever it ran."""
    cases = set().union(*(s.outputs for s in sides.values()))
    differ = [c.label for c in cases if len(set().union(*(s.outputs.get(c, set()) for s in sides.values()))) > 1]
    return {"cases": len(cases), "differ": sorted(differ)}


def impossible(data: dict) -> list[str]:
    """Figures no real measurement gives: a time or rate that is not positive (or not a number)."""
    out = []
    for name, r in data["table"].items():
        for key in ("seconds", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "decode_ms_p50", "itl_gap_p50_ms"):
            v = r.get(key)
            if key == "itl_gap_p50_ms" and v is not None and v == 0:
                continue  # tokens that arrived in one response: a gap of 0 is possible, a negative one is not
            if v is None or not math.isfinite(v) or v <= 0:
                out.append(f"{name}: {key} = {v}")
        if r["requests"] <= 0 or r["tokens"] <= 0:
            out.append(f"{name}: {r['requests']} requests, {r['tokens']} tokens")
        if r["tokens"] > r["requests"] * r["max_tokens"]:
            out.append(f"{name}: {r['tokens']} tokens from {r['requests']} requests of at most {r['max_tokens']}")
    for name, v in data["ratios"].items():
        if not (math.isfinite(v) and v > 0):
            out.append(f"ratio {name} = {v}")
    routing = data["routing"]["routing_us"]["mean"]
    if not (math.isfinite(routing) and routing > 0):
        out.append(f"routing mean {routing} us")
    for key in ("read_gbps", "copy_gbps", "matmul_gflops"):
        v = data["machine"].get(key, float("nan"))
        if not (math.isfinite(v) and v > 0):
            out.append(f"machine {key} = {v}")
    return out


def report(sides: dict[str, Side], routing: dict, machine: dict, environment: dict, config: dict,
           problems: list[str]) -> dict:
    table = {name: side_row(side) for name, side in sides.items()}
    c, p = table[CLUSTER], table[PAIR]
    ratios = {name: c[key] / p[key] if p[key] else float("nan") for name, key in RATIOS.items()}
    data = {"environment": environment, "config": config, "table": table, "ratios": ratios,
            "spread": spread.spread({}, sides[CLUSTER].started), "same_outputs": same_outputs(sides),
            "routing": routing, "routing_overhead_ms": routing["routing_us"]["mean"] / 1e3,
            "routing_limit_ms": ROUTING_LIMIT_MS, "machine": machine}
    data["impossible"] = problems + impossible(data)
    data["routing_met"] = data["routing_overhead_ms"] < ROUTING_LIMIT_MS
    return data


def write(data: dict, out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-cluster-{stamp}.json"
    path.write_text(json.dumps(json_safe(data), indent=1) + "\n")
    shutil.copyfile(path, out_dir / "bench-cluster-latest.json")
    return path


def render_text(data: dict) -> str:
    env = data["environment"]
    head = (f"{'side':<8} {'servers':>9} {'conc':>4} {'reqs':>5} {'out tok':>7} {'req/s':>7} {'out tok/s':>9} "
            f"{'TTFT p50 ms':>11} {'ITL p50 ms':>10} {'gap p50 ms':>10}")
    lines = [f"cpu: {env['cpu_model']}, {env['cores']} cores, {' '.join(env['cpu_flags'])}",
             format_machine(data["machine"]) + f"; one thread reads {data['machine']['read_gbps_1_thread']:.1f} GB/s",
             f"load average {env['loadavg_start']} at the start, {env['loadavg_end']} at the end; other processes "
             f"{100 * env.get('other_processes_cpu_share', float('nan')):.0f}% of the CPU, steal "
             f"{100 * env.get('steal_cpu_share', float('nan')):.0f}%", "", head, "-" * len(head)]
    for name, r in data["table"].items():
        lines.append(f"{name:<8} {str(r['encoders']) + 'E+' + str(r['languages']) + 'L':>9} {r['concurrency']:>4} "
                     f"{r['requests']:>5} {r['tokens']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>9.1f} "
                     f"{r['ttft_p50_ms']:>11.1f} {r['decode_ms_p50']:>10.2f} {r['itl_gap_p50_ms']:>10.2f}")
    rt = data["ratios"]
    lines += ["", "cluster / pair: " + ", ".join(f"{k} {v:.2f}" for k, v in rt.items()), "",
              "sequences the cluster's language servers started in the measured rounds:",
              spread.format_spread(data["spread"]), ""]
    same = data["same_outputs"]
    lines.append(f"greedy tokens: {same['cases'] - len(same['differ'])} of {same['cases']} cases the same on both "
                 "sides and in every round" + (f" (differ: {', '.join(same['differ'])})" if same["differ"] else ""))
    ro = data["routing"]
    lines += [f"routing (in process, {ro['requests']} requests, {ro['servers']} language servers, a "
              f"{ro['image_kib']} KiB image per conversation):",
              bench_routing.format_row("  conversation key", ro["key_us"]),
              bench_routing.format_row("  choose + started + finished", ro["choose_us"]),
              bench_routing.format_row("  routing, per request", ro["routing_us"]),
              f"routing overhead {data['routing_overhead_ms']:.3f} ms per request: "
              + ("under" if data["routing_met"] else "NOT under") + f" {data['routing_limit_ms']:g} ms"]
    for problem in data["impossible"]:
        lines.append(f"IMPOSSIBLE: {problem}")
    return "\n".join(lines)


# -- the servers ------------------------------------------------------------------------------------
def start_sides(shapes: dict[str, tuple[int, int]], checkpoint: Path, build: Path, sets: list[str],
                timeout: float, attempts: int = 2, notes: list[str] | None = None) -> dict:
    """Loopback clusters (name -> (encoders, languages)) on distinct free ports, started one after
    the other (fewer servers loading at once on a small host); name -> (args, members).

    A side whose servers are not all ready within `timeout` is stopped and started again on new
    ports, up to `attempts` times, each time said in `notes` (on this host a language server's
    tritonserver now and then never finished loading its models: the previous attempt's logs
    stay in <build>/<side>-attempt<N>/). Stops what it started and raises RuntimeError, naming
    the server and its log, when the last attempt fails."""
    from qwen3vl_triton.serve import cluster

    planned, taken = {}, set()
    try:
        for name, (encoders, languages) in shapes.items():
            for attempt in range(1, attempts + 1):
                folder = build / (name if attempt == 1 else f"{name}-attempt{attempt}")
                argv = ["--encoders", str(encoders), "--languages", str(languages), "--checkpoint", str(checkpoint),
                        "--http-port", "0", "--grpc-port", "0", "--build-dir", str(folder), "--timeout", str(timeout)]
                for pair in [*BENCH_SETS, *sets]:
                    argv += ["--set", pair]
                args = cluster.parse_args(argv)
                members = cluster.plan(args, taken)
                taken |= {p for m in members for p in (m.http, m.grpc, m.metrics)}
                planned[name] = (args, members)
                t0 = time.monotonic()
                log(f"[bench-cluster] starting the {name}: {encoders} encoder + {languages} language server(s) on "
                    f"{checkpoint} (logs: {folder / 'cluster'}) ...")
                try:
                    cluster.launch(members, args, cluster.prepare(args, members))
                    log(f"[bench-cluster] the {name} is ready in {time.monotonic() - t0:.0f}s")
                    break
                except RuntimeError as exc:
                    cluster.stop_all(members)
                    del planned[name]
                    message = f"the {name} did not start (attempt {attempt} of {attempts}): {exc} (logs: {folder})"
                    if attempt == attempts:
                        raise RuntimeError(message) from None
                    log(f"[bench-cluster] WARNING: {message}; starting it again")
                    if notes is not None:
                        notes.append(message)
    except BaseException:
        stop_sides(planned)
        raise
    return planned


def stop_sides(planned: dict) -> None:
    from qwen3vl_triton.serve import cluster

    cluster.stop_all([m for _, members in planned.values() for m in members])


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_cluster", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="QUICK size: 2 rounds of 12 requests per side, 32 tokens")
    ap.add_argument("--checkpoint", help="the checkpoint (default: checkpoints/tiny, built on first use)")
    ap.add_argument("--encoders", type=int, help="the cluster's encoder servers (2)")
    ap.add_argument("--languages", type=int, help="the cluster's language servers (3)")
    ap.add_argument("--concurrency", type=int, help="closed-loop workers on each side (6)")
    ap.add_argument("--rounds", type=int, help="measured rounds per side (4; QUICK 2)")
    ap.add_argument("--requests", type=int, help="requests per round (24; QUICK 12)")
    ap.add_argument("--max-tokens", type=int, help="max_tokens of every request (64; QUICK 32)")
    ap.add_argument("--image-sizes", type=int, help="distinct image sizes of the workload (4)")
    ap.add_argument("--seed", type=int, help="workload seed (0)")
    ap.add_argument("--routing-requests", type=int, help="requests of the in-process routing measure (20000; "
                                                         "QUICK 5000)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a serving setting of every server of both sides (after the bench's own: "
                         + ", ".join(BENCH_SETS) + ")")
    ap.add_argument("--cluster-json", help="drive the running servers this cluster.json lists as the cluster "
                                           "instead of starting one")
    ap.add_argument("--pair-json", help="the same for the pair")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "bench-cluster"))
    ap.add_argument("--out-dir", default=str(REPORTS))
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds each side's servers have to be ready (then it is started once more)")
    args = ap.parse_args(argv)
    for name in ("encoders", "languages", "concurrency", "rounds", "requests", "max_tokens", "image_sizes",
                 "routing_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from load_tests.bench import HostLoad
    from load_tests.bench_micro import machine_rates
    from qwen3vl_triton.model.tiny import ensure_checkpoint

    cfg = Config.make(args.quick, encoders=args.encoders, languages=args.languages, concurrency=args.concurrency,
                      rounds=args.rounds, requests=args.requests, max_tokens=args.max_tokens,
                      image_sizes=args.image_sizes, seed=args.seed, routing_requests=args.routing_requests)
    t_start = time.perf_counter()
    host = HostLoad()
    env = {"cores": os.cpu_count(), **cpu_features(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    checkpoint = (Path(args.checkpoint) if args.checkpoint
                  else ensure_checkpoint(ROOT / "checkpoints" / "tiny", "tiny", log=log)).resolve()
    min_pixels, max_pixels = pixel_limits(checkpoint)
    workload = Workload.build(max_pixels, min_pixels, seed=cfg.seed, max_tokens=cfg.max_tokens, sizes=cfg.image_sizes)
    given = {CLUSTER: args.cluster_json, PAIR: args.pair_json}
    try:
        servers = {name: spread.read_cluster(path) for name, path in given.items() if path}
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if CLUSTER in servers:
        cfg.encoders = sum(1 for s in servers[CLUSTER] if s["role"] == "encoder")
        cfg.languages = sum(1 for s in servers[CLUSTER] if s["role"] == "language")
    machine = machine_rates()  # before any server: the machine's capacity, quiet
    log(f"[bench-cluster] {format_machine(machine)}")
    image_kib = max(1, max((len(i) for c in workload.cases for i in c.images), default=1024) // 1024)
    routing = bench_routing.measure(cfg.languages, cfg.routing_requests, image_kib)
    log(f"[bench-cluster] routing {routing['routing_us']['mean']:.1f} us per request (mean)")

    planned, notes = {}, []
    try:
        shapes = {name: shape for name, shape in ((CLUSTER, (cfg.encoders, cfg.languages)), (PAIR, (1, 1)))
                  if name not in servers}
        if shapes:
            planned = start_sides(shapes, checkpoint, Path(args.build_dir), args.set, args.timeout, notes=notes)
        servers.update({name: [m.record() for m in members] for name, (_, members) in planned.items()})
        sides = {name: Side(name, servers[name]) for name in (CLUSTER, PAIR)}
        problems = measure(sides, workload, cfg)
    except Exception as exc:  # noqa: BLE001 -- a failed request or server: one line, exit 1
        log(f"[bench-cluster] FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if planned:
            stop_sides(planned)  # every launcher waited for: their CPU time counts as the bench's own
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env.update(host.share())
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    config = {**vars(cfg), "checkpoint": str(checkpoint), "model": MODEL,
              "settings": [*BENCH_SETS, *args.set] if planned else "the running servers' own",
              "cluster_json": args.cluster_json, "pair_json": args.pair_json}
    data = report(sides, routing, machine, env, config, problems)
    data["start_retries"] = notes
    path = write(data, Path(args.out_dir), time.strftime("%Y%m%d-%H%M%S"))
    log("")
    log(render_text(data))
    log("")
    log(f"[bench-cluster] wrote {path} and bench-cluster-latest.json in {env['seconds']}s")
    for message in HostLoad.warnings(env) + [f"restarted: {n}" for n in notes]:
        log(f"[bench-cluster] WARNING: {message}")
    return 1 if data["impossible"] or not data["routing_met"] else 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
