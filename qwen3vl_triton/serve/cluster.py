"""A loopback cluster: E encoder servers and L language servers on 127.0.0.1 behind one front door.

    python -m qwen3vl_triton.serve.cluster --encoders 2 --languages 3 --http-port 8000 --grpc-port 8001 \
        --openai-port 9000 [--checkpoint DIR] [--set KEY=VALUE ...]      (make cluster ENCODERS=2 LANGUAGES=3)

Each server is a `qwen3vl-serve` process (serve/launcher.py: the same checks, settings and stop,
a language server's drain included). The language servers start first; every encoder server's
`qwen3vl_disagg` gets all of them as `language_urls`. The front door is the first encoder server,
on the given HTTP and gRPC ports, with the OpenAI endpoint; every other server takes free ports.
The serving settings are the cluster's shared ones: the file `deploy/k8s/base/serving.env` where the
checkout has it (the Kubernetes manifests read the same file), else Settings' defaults, then each
`--set`. Writes `<build-dir>/cluster.json` (one object per server: role, name, pid, tritonserver_pid,
http, grpc, metrics), prints one `ready:` line when every server is ready, and stops them all on SIGINT
or SIGTERM (the language servers drain).

In Python (load_tests/bench_cluster.py starts two clusters side by side this way):

    with running(["--encoders", "2", "--languages", "3", "--http-port", "0", "--grpc-port", "0"]) as members:
        front(members).grpc, [m.metrics for m in members if m.role == "language"]

(port 0 on the command line: a free one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qwen3vl_triton.serve.server import _stop_with_parent, free_ports, port_free

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILE = ROOT / "deploy" / "k8s" / "base" / "serving.env"  # the cluster's settings, where present


@dataclass
class Member:
    role: str  # encoder | language
    name: str
    http: int
    grpc: int
    metrics: int
    openai: int = 0
    pid: int = 0  # the qwen3vl-serve process (SIGTERM stops it: a language server drains first)
    tritonserver_pid: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)
    ready_line: str = ""

    def record(self) -> dict:
        """Its object in cluster.json."""
        out = {"role": self.role, "name": self.name, "pid": self.pid, "tritonserver_pid": self.tritonserver_pid,
               "http": self.http, "grpc": self.grpc, "metrics": self.metrics}
        if self.openai:
            out["openai"] = self.openai
        return out


def launcher_command(member: Member, args, extra_sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--topology", member.role,
           "--address", "127.0.0.1", "--http-port", str(member.http), "--grpc-port", str(member.grpc),
           "--metrics-port", str(member.metrics), "--build-dir", str(Path(args.build_dir) / "cluster" / member.name),
           "--admin-key", args.admin_key, "--timeout", str(args.timeout)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if SETTINGS_FILE.is_file():
        cmd += ["--settings-file", str(SETTINGS_FILE)]
    for pair in [*args.set, *extra_sets]:
        cmd += ["--set", pair]
    if member.openai:
        cmd += ["--openai-port", str(member.openai)]
    return cmd


def start(member: Member, cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    member.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
                                      start_new_session=True, preexec_fn=_stop_with_parent)
    member.pid = member.process.pid


def wait_ready(member: Member, deadline: float) -> None:
    """Read the launcher's output until its `ready:` line (the rest of its output stays readable)."""
    lines: list[str] = []

    def read():
        for line in member.process.stdout:
            if line.startswith("ready:"):
                member.ready_line = line.strip()
                break
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(deadline - time.monotonic(), 0))
    if not member.ready_line:
        code = member.process.poll()
        why = "timed out" if code is None else f"exit code {code}"
        raise RuntimeError(f"{member.name} was not ready ({why}): {''.join(lines[-5:]).strip()}")
    # keep draining its output so the launcher never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in member.process.stdout], daemon=True).start()
    for child in psutil.Process(member.pid).children(recursive=True):
        if child.name().startswith("tritonserver"):
            member.tritonserver_pid = child.pid
            break


def stop_all(members: list[Member], timeout: float = 120) -> None:
    """SIGTERM to every launcher at once (encoders first: their requests end, the language servers drain)."""
    for role in ("encoder", "language"):
        for m in members:
            if m.role == role and m.process is not None and m.process.poll() is None:
                m.process.send_signal(signal.SIGTERM)
    for m in members:
        if m.process is not None:
            try:
                m.process.wait(timeout)
            except subprocess.TimeoutExpired:
                m.process.kill()
                m.process.wait()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m qwen3vl_triton.serve.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", type=int, default=2)
    ap.add_argument("--languages", type=int, default=3)
    ap.add_argument("--checkpoint", help="the checkpoint directory (default: the tiny test checkpoint)")
    ap.add_argument("--http-port", type=int, default=8000, help="the front door's HTTP port (0: a free one)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="the front door's gRPC port (0: a free one)")
    ap.add_argument("--metrics-port", type=int, default=0, help="the front door's metrics port (default: a free one)")
    ap.add_argument("--openai-port", type=int, default=0, help="the OpenAI endpoint's port (0: none)")
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a serving setting, every server")
    ap.add_argument("--admin-key", default=os.environ.get("QWEN3VL_ADMIN_KEY"),
                    help="the admin key of every server (default $QWEN3VL_ADMIN_KEY, else a random one written "
                         "to <build-dir>/admin-key)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each server has to be ready")
    args = ap.parse_args(argv)
    for name in ("encoders", "languages"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(p.partition("=")[0] in ("language_urls", "language_url") for p in args.set):
        ap.error("--set language_urls/language_url: the cluster sets them (its own language servers)")
    return args


def check_ports(args) -> str | None:
    """Why a port given on the command line cannot be used (None: they all can)."""
    for name in ("http_port", "grpc_port", "metrics_port", "openai_port"):
        port = getattr(args, name)
        if port and not port_free("127.0.0.1", port):
            return f"--{name.replace('_', '-')} {port} is already in use on 127.0.0.1"
    return None


def plan(args, taken: set[int] = frozenset()) -> list[Member]:
    """The servers and their ports: the language servers, then the encoder servers, the first of
    which is the front door (on the given ports; a port of 0 and every other server's: free ones,
    none of `taken`)."""
    ports = iter(free_ports(3 * (args.encoders + args.languages) + 4))
    given = {args.http_port, args.grpc_port, args.metrics_port, args.openai_port, *taken}

    def port():
        return next(p for p in ports if p not in given)

    members = [Member("language", f"language-{i}", port(), port(), port()) for i in range(args.languages)]
    for i in range(args.encoders):
        if i == 0:
            members.append(Member("encoder", "encoder-0", args.http_port or port(), args.grpc_port or port(),
                                  args.metrics_port or port(), openai=args.openai_port))
        else:
            members.append(Member("encoder", f"encoder-{i}", port(), port(), port()))
    return members


def front(members: list[Member]) -> Member:
    """The front door: the first encoder server."""
    return next(m for m in members if m.role == "encoder")


def launch(members: list[Member], args, build: Path, stop: threading.Event | None = None) -> bool:
    """Start the language servers, then the encoder servers with every language server in
    `language_urls`; wait until each is ready (RuntimeError naming the one that is not) and write
    <build>/cluster.json. False when `stop` was set meanwhile (the caller stops them: stop_all)."""
    urls = ",".join(f"127.0.0.1:{m.grpc}" for m in members if m.role == "language")
    deadline = time.monotonic() + args.timeout
    for role, extra in (("language", []), ("encoder", [f"language_urls={urls}"])):
        group = [m for m in members if m.role == role]
        for m in group:
            start(m, launcher_command(m, args, extra), build / "cluster" / f"{m.name}.log")
        for m in group:
            wait_ready(m, deadline)
            if stop is not None and stop.is_set():
                return False
    (build / "cluster.json").write_text(json.dumps([m.record() for m in members], indent=1) + "\n")
    return True


def prepare(args, members: list[Member]) -> Path:
    """The build folder (absolute), and the cluster's admin key in `args` (a random one written to
    <build>/admin-key-cluster-<front door's grpc port> when none was given)."""
    build = Path(args.build_dir).resolve()
    args.build_dir = str(build)
    if not args.admin_key:
        from qwen3vl_triton.serve.launcher import admin_key

        args.admin_key, _ = admin_key(None, build, "cluster", front(members).grpc)
    return build


@contextmanager
def running(argv: list[str], taken: set[int] = frozenset()):
    """The cluster of `argv` (this module's command line), every server ready; its members (cluster.json
    written in its --build-dir). Stopped, all of it, on leaving."""
    args = parse_args(argv)
    problem = check_ports(args)
    if problem:
        raise RuntimeError(problem)
    members = plan(args, taken)
    build = prepare(args, members)
    try:
        launch(members, args, build)
        yield members
    finally:
        stop_all(members)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_ports(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    members = plan(args)
    build = prepare(args, members)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if not launch(members, args, build, stop):
            return 1
        door = front(members)
        print(f"ready: front door http=127.0.0.1:{door.http} grpc=127.0.0.1:{door.grpc} model=qwen3vl_disagg"
              + (f" openai=http://127.0.0.1:{door.openai}/v1" if door.openai else "")
              + f" encoders={args.encoders} languages={args.languages} servers={build / 'cluster.json'}", flush=True)
        reported = set()
        while not stop.wait(0.5):  # a server that exits is reported; the others go on (sequences move)
            for m in members:
                if m.process.poll() is not None and m.name not in reported:
                    reported.add(m.name)
                    print(f"warning: {m.name} exited with code {m.process.returncode}; see "
                          f"{build / 'cluster' / (m.name + '.log')}", file=sys.stderr, flush=True)
            if len(reported) == len(members):
                return 1
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(members)
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
