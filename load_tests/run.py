"""Bounded headless Locust run against the qwen3vl ensemble, with reports and a summary table.

    python -m load_tests.run --users 4 --duration 15                       # starts a local server (tiny checkpoint)
    python -m load_tests.run --users 16 --duration 120 --url host:8000 --grpc-url host:8001
    python -m load_tests.run --users 6 --duration 60 --cluster build/cluster.json  # a running `make cluster`

Without --url it renders the single-server repository for the checkpoint (default: the tiny one,
built on first use), starts tritonserver on free ports of 127.0.0.1 and stops it afterwards (by PID).
Locust runs headless with --run-time and --stop-timeout; the whole run is bounded as well: a Locust
process still alive `--grace` seconds after its run time and stop timeout is stopped (SIGTERM, then
SIGKILL, by PID) and the run fails. Reports go to load_tests/reports/<prefix>{_stats.csv,
_stats_history.csv, _failures.csv, _exceptions.csv, .html}. The exit code is Locust's: non-zero when
any request failed.

With --cluster (the cluster.json of a running `make cluster`) the users load qwen3vl_disagg on
every encoder server of it (each user's requests go round the encoders; the OpenAI user, when the
front door has the endpoint, on the front door), and the run reads each language server's
`qwen3vl_language_sequences_started_total` before and after: the report shows how the sequences
spread over the language servers, each one's count against the mean (target: 0.5x-1.5x), printed
and written to <prefix>_spread.json (load_tests/spread.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPORTS = Path(__file__).resolve().parent / "reports"
REQUEST_TYPES = ("HTTP", "gRPC", "OpenAI")


# -- the bounded Locust process ------------------------------------------------------------------
@dataclass
class Finished:
    returncode: int
    seconds: float
    timed_out: bool


def run_bounded(cmd: list[str], timeout: float, term_grace: float = 15.0, env: dict | None = None) -> Finished:
    """Run `cmd` in its own session; past `timeout` send SIGTERM, then SIGKILL after `term_grace`
    (to that process group only, which this function started)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout)
        return Finished(code, time.monotonic() - t0, False)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(term_grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        return Finished(proc.returncode, time.monotonic() - t0, True)
    except BaseException:  # Ctrl-C: do not leave Locust behind
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group whose leader is the process started above (start_new_session)
    except ProcessLookupError:
        pass


def locust_command(args, http_url: str, grpc_url: str, prefix: Path, openai_url: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users),
           "--run-time", f"{args.duration}s", "--stop-timeout", f"{args.stop_timeout}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary", "--loglevel", args.loglevel,
           "--http-url", http_url, "--grpc-url", grpc_url, "--model", args.model,
           "--max-tokens", str(args.max_tokens), "--image-sizes", str(args.image_sizes),
           "--workload-seed", str(args.seed)]
    if args.max_pixels:
        cmd += ["--max-pixels", str(args.max_pixels)]
    else:
        cmd += ["--checkpoint", str(args.checkpoint_path)]
    if openai_url:
        cmd += ["--openai-url", openai_url]
    # named, so Locust does not run every user class of the locustfile
    return cmd + user_classes(args, openai_url)[0]


USER_CLASSES = {"HttpGenerateUser": "HTTP", "GrpcGenerateUser": "gRPC", "OpenAIChatUser": "OpenAI",
                "VideoUser": "video"}
DEFAULT_CLASSES = ("HttpGenerateUser", "GrpcGenerateUser", "OpenAIChatUser")  # VideoUser when named


def user_classes(args, openai_url: str | None) -> tuple[list[str], dict[str, str]]:
    """The user classes this run gives users to, and those it skips with the reason (name -> reason).

    Locust gives each user one class, so with fewer users than classes some class would get none
    and its row would read 0 without saying why: the run keeps the first `--users` classes instead
    and names the others. With at least as many users as classes, every class gets a user."""
    wanted = list(args.user_classes) or list(DEFAULT_CLASSES)
    skipped = {}
    if "OpenAIChatUser" in wanted and not openai_url:
        wanted.remove("OpenAIChatUser")
        skipped["OpenAIChatUser"] = "no OpenAI endpoint (give --openai-url, or let the run start a local server)"
    if args.users < len(wanted):
        for name in wanted[args.users:]:
            skipped[name] = (f"{args.users} user(s) for {len(wanted)} user classes: give --users {len(wanted)} "
                             "or more to run every class")
        wanted = wanted[:args.users]
    return wanted, skipped


# -- reading the report ----------------------------------------------------------------------------
def read_stats(csv_path: str | Path) -> dict[tuple[str, str], dict[str, str]]:
    """Rows of Locust's <prefix>_stats.csv keyed by (Type, Name); the total is ("", "Aggregated")."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def _num(row: dict | None, column: str) -> float:
    if not row:
        return float("nan")
    try:
        return float(row[column])
    except (KeyError, ValueError):
        return float("nan")


def summary_table(stats: dict[tuple[str, str], dict[str, str]], users: int | None = None,
                  skipped: dict[str, str] | None = None) -> str:
    """One line per protocol: requests, failures, throughput, latency / TTFT / ITL percentiles (ms);
    a protocol whose user class the run skipped (`skipped`: class -> reason) says so and why."""
    skipped_kinds = {USER_CLASSES.get(name, name): reason for name, reason in (skipped or {}).items()}
    head = (f"{'protocol':<8} {'requests':>8} {'failures':>8} {'req/s':>7} {'tokens/s':>9}   "
            f"{'latency p50/p90/p99 ms':>22}   {'TTFT p50/p90/p99 ms':>20}   {'ITL p50/p90/p99 ms':>19}")
    lines = [head, "-" * len(head)]

    def pct(row):
        return "/".join("-" if _num(row, c) != _num(row, c) else f"{_num(row, c):.0f}" for c in ("50%", "90%", "99%"))

    kinds = [*REQUEST_TYPES, *(k for k in ("video",) if k not in REQUEST_TYPES and (k, "generate") in stats)]
    for kind in kinds:
        gen, ttft, itl = (stats.get((kind, n)) for n in ("generate", "ttft", "itl"))
        if gen is None:
            lines.append(f"{kind:<8} {'0':>8}" + (f"   skipped: {skipped_kinds[kind]}" if kind in skipped_kinds
                                                  else ""))
            continue
        rps = _num(gen, "Requests/s")
        tokens_per_s = rps * _num(gen, "Average Content Size")  # content size = streamed responses (tokens)
        lines.append(f"{kind:<8} {int(_num(gen, 'Request Count')):>8} {int(_num(gen, 'Failure Count')):>8} "
                     f"{rps:>7.2f} {tokens_per_s:>9.1f}   {pct(gen):>22}   {pct(ttft):>20}   {pct(itl):>19}")
    if users:
        lines.append(f"({users} users; tokens/s = generate req/s x mean streamed responses per request)")
    return "\n".join(lines)


def failures(prefix: Path, limit: int = 5) -> list[str]:
    path = Path(f"{prefix}_failures.csv")
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [f"{r['Method']} {r['Name']} x{r['Occurrences']}: {r['Error']}" for r in csv.DictReader(f)][:limit]


# -- a local server --------------------------------------------------------------------------------
def start_local_server(checkpoint: Path, build: Path, log=print):
    """tritonserver (single topology) and the OpenAI endpoint beside it."""
    from qwen3vl_triton.serve.cpu_engine import render_prepared
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import OpenAIServer, Ports, TritonServer, free_ports

    settings = Settings()
    repo, _ = render_prepared(checkpoint, build / "repository", build, settings, topology="single", log=log)
    http, grpc, metrics, openai_port = free_ports(4)
    server = TritonServer(repo, Ports(http, grpc, metrics), build_dir=build, log_file=build / "tritonserver.log")
    log(f"starting tritonserver for {checkpoint} (log: {server.log_file}) ...")
    t0 = time.monotonic()
    server.start(timeout=600, log=log)
    try:
        server.openai = OpenAIServer(server.grpc_url, "127.0.0.1", openai_port, settings,
                                     log_file=build / "openai.log").start()
    except BaseException:
        server.stop()
        raise
    log(f"ready in {time.monotonic() - t0:.0f}s: http {server.http_url}, grpc {server.grpc_url}, "
        f"openai {server.openai.url}")
    return server


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--users", type=int, default=4,
                    help="concurrent users, split evenly between the user classes (at least one user per class: "
                         "with fewer users, the classes past --users are skipped, and the run says so)")
    ap.add_argument("--duration", type=int, default=30, help="seconds of load (Locust --run-time)")
    ap.add_argument("--spawn-rate", type=float, default=0, help="users started per second (default: all at once)")
    ap.add_argument("--stop-timeout", type=int, default=30,
                    help="seconds users get to finish their request at the end (Locust --stop-timeout)")
    ap.add_argument("--grace", type=int, default=60,
                    help="seconds Locust may take beyond run time + stop timeout (start-up, reports) before it is "
                         "stopped")
    ap.add_argument("--url", default=os.environ.get("QWEN3VL_HTTP_URL") or None,
                    help="HOST:PORT of a running server's HTTP endpoint (default: start a local server)")
    ap.add_argument("--grpc-url", default=os.environ.get("QWEN3VL_GRPC_URL") or None,
                    help="HOST:PORT of its gRPC endpoint (default: the --url host, port + 1, as Triton's 8000/8001)")
    ap.add_argument("--openai-url", default=os.environ.get("QWEN3VL_OPENAI_URL") or None,
                    help="HOST:PORT of the server's OpenAI endpoint (qwen3vl-serve --openai-port): adds the "
                         "OpenAIChatUser (a local server always has one)")
    ap.add_argument("--cluster", default=os.environ.get("QWEN3VL_CLUSTER") or None, metavar="CLUSTER_JSON",
                    help="a running loopback cluster's cluster.json (make cluster writes build/cluster.json): load "
                         "its encoder servers and report the spread of sequences over its language servers")
    ap.add_argument("--model", default=None,
                    help="qwen3vl (single server; the default) or qwen3vl_disagg (an encoder host of the "
                         "disaggregated topology; the default with --cluster)")
    ap.add_argument("--checkpoint", help="checkpoint to serve and to read the pixel limit from "
                                         "(default: checkpoints/tiny, built on first use)")
    ap.add_argument("--max-pixels", type=int, default=int(os.environ.get("QWEN3VL_MAX_PIXELS", "0")),
                    help="largest image in pixels (default: the checkpoint's preprocessor max_pixels)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-sizes", type=int, default=4, help="distinct image sizes, small to the pixel limit")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (images and request mix)")
    ap.add_argument("--reports", default=str(REPORTS), help="report directory")
    ap.add_argument("--prefix", help="report file prefix (default: u<users>-d<duration>-<timestamp>)")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "load-test"), help="rendered repository and log "
                                                                                  "of a local server")
    ap.add_argument("--loglevel", default="WARNING", help="Locust's log level")
    ap.add_argument("user_classes", nargs="*", metavar="USER_CLASS",
                    help="HttpGenerateUser, GrpcGenerateUser, OpenAIChatUser and/or VideoUser (short MP4 clips over "
                         "gRPC) (default: the first three; the third needs an OpenAI endpoint, which a local server "
                         "always has)")
    args = ap.parse_args(argv)
    if args.users < 1 or args.duration < 1:
        ap.error("--users and --duration must be >= 1")
    unknown = [name for name in args.user_classes if name not in USER_CLASSES]
    if unknown:
        ap.error(f"unknown user class {', '.join(unknown)}: choose from {', '.join(USER_CLASSES)}")
    if args.cluster and args.url:
        ap.error("--cluster gives the URLs: leave out --url")
    args.model = args.model or ("qwen3vl_disagg" if args.cluster else "qwen3vl")
    if args.url is None and not args.cluster and args.model != "qwen3vl":
        ap.error(f"--model {args.model} needs --url or --cluster: the local server serves qwen3vl")
    return args


def cluster_urls(servers: list[dict], openai_url: str | None = None) -> tuple[str, str, str | None]:
    """(HTTP urls, gRPC urls, OpenAI url) of a cluster.json's encoder servers: every encoder, comma-
    separated (client.Client takes each request to the next one); the front door's OpenAI endpoint
    unless one is given."""
    encoders = [s for s in servers if s["role"] == "encoder"]
    front = encoders[0]
    return (",".join(f"127.0.0.1:{s['http']}" for s in encoders), ",".join(f"127.0.0.1:{s['grpc']}" for s in encoders),
            openai_url or (f"127.0.0.1:{front['openai']}" if front.get("openai") else None))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.max_pixels or (args.url is None and not args.cluster):
        from qwen3vl_triton.model.tiny import ensure_checkpoint

        args.checkpoint_path = (Path(args.checkpoint) if args.checkpoint
                                else ensure_checkpoint(ROOT / "checkpoints" / "tiny"))
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    prefix = reports / (args.prefix or f"u{args.users}-d{args.duration}-{time.strftime('%Y%m%d-%H%M%S')}")

    server, servers, before = None, None, None
    if args.cluster:
        from load_tests import spread

        try:
            servers = spread.read_cluster(args.cluster)
            before = spread.sequences_started(servers)
        except (OSError, ValueError, KeyError) as exc:  # no such file, not a cluster's, a server down
            print(f"error: --cluster {args.cluster}: {exc}", file=sys.stderr)
            return 1
    try:
        if servers is not None:
            http_url, grpc_url, openai_url = cluster_urls(servers, args.openai_url)
        elif args.url is None:
            try:
                server = start_local_server(args.checkpoint_path, Path(args.build_dir).resolve())
            except Exception as exc:  # noqa: BLE001 -- render or start failure: one clear line
                print(f"error: could not start a local server: {exc}", file=sys.stderr)
                return 1
            http_url, grpc_url, openai_url = server.http_url, server.grpc_url, server.openai.url
        else:
            openai_url = args.openai_url
            http_url = args.url.removeprefix("http://")
            host, _, port = http_url.rpartition(":")
            grpc_url = args.grpc_url or f"{host}:{int(port) + 1}"
        bound = args.duration + args.stop_timeout + args.grace
        classes, skipped = user_classes(args, openai_url)
        print(f"locust: {args.users} users for {args.duration}s against http {http_url}, grpc {grpc_url}"
              + (f", openai {openai_url}" if openai_url else "") + f" (bounded at {bound}s)", flush=True)
        print("user classes: " + ", ".join(classes), flush=True)
        for name, reason in skipped.items():
            print(f"skipped: {name}: {reason}", flush=True)
        done = run_bounded(locust_command(args, http_url, grpc_url, prefix, openai_url), timeout=bound)
    finally:
        if server is not None:
            server.openai.stop()
            server.stop()
            print("local server stopped", flush=True)

    stats_csv = Path(f"{prefix}_stats.csv")
    print(f"\nreports: {stats_csv} (+ _stats_history, _failures, _exceptions), {prefix}.html"
          + (f", {prefix}_spread.json" if servers is not None else ""))
    if stats_csv.is_file():
        print(summary_table(read_stats(stats_csv), args.users, skipped))
        for line in failures(prefix):
            print(f"failure: {line}")
    if servers is not None:
        try:
            spread_of_run = spread.spread(before, spread.sequences_started(servers))
        except OSError as exc:
            print(f"error: the language servers' counters could not be read after the run: {exc}", file=sys.stderr)
            return 1
        Path(f"{prefix}_spread.json").write_text(json.dumps(spread_of_run, indent=1) + "\n")
        print("\nsequences per language server (qwen3vl_language_sequences_started_total, after - before):")
        print(spread.format_spread(spread_of_run))
    if done.timed_out:
        print(f"error: locust did not exit within {bound}s and was stopped", file=sys.stderr)
        return 1
    print(f"locust exited with code {done.returncode} after {done.seconds:.1f}s")
    return done.returncode


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
