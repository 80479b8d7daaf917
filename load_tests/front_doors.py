"""Front doors under large and slow clients: how long a large body takes to be refused, what it costs
every server process (resident memory before, at the peak, and settled after), and whether slow
connections are closed.

    python -m load_tests.front_doors                 # starts tritonserver + the OpenAI endpoint here
    python -m load_tests.front_doors --cases openai  # only the OpenAI endpoint's cases

Bodies are streamed from a 1 MiB block (the client holds no copy); each is a valid request whose one
image is all but its size, so only a size bound can refuse it. The client sends while it reads, as
curl does, and stops sending once an answer comes. Memory is sampled every 20 ms per process
(tritonserver, each Python-backend stub, the OpenAI server); "after" is read `--settle` seconds after
the answer. The report is printed and written to load_tests/reports/front-doors-latest.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "load_tests" / "reports"
MiB = 2**20
BLOCK = b"A" * MiB  # base64 of zero bytes: a well-formed image payload of any length


# -- processes and their memory -----------------------------------------------------------------------
def server_processes(triton, openai=None) -> dict[str, psutil.Process]:
    """Label -> process: tritonserver, each Python-backend stub ("stub <model>"), the OpenAI server."""
    out = {"tritonserver": psutil.Process(triton.process.pid)}
    for p in triton.children():
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
            out[f"stub {Path(cmd[1]).parent.parent.name}"] = p
    if openai is not None and openai.process is not None:
        out["openai"] = psutil.Process(openai.process.pid)
    return out


def rss_mib(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in processes.items():
        try:
            out[name] = p.memory_info().rss / MiB
        except psutil.NoSuchProcess:
            out[name] = float("nan")
    return out


class MemoryWatch:
    """Resident memory of every process: `before` (on entry), `peak` (sampled every `period` s while
    inside), `after` (call settle())."""

    def __init__(self, processes: dict[str, psutil.Process], period: float = 0.02):
        self.processes, self.period = processes, period
        self.before = self.peak = self.after = None
        self._stop = threading.Event()

    def __enter__(self) -> "MemoryWatch":
        self.before = rss_mib(self.processes)
        self.peak = dict(self.before)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.period):
            for name, value in rss_mib(self.processes).items():
                self.peak[name] = max(self.peak[name], value)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def settle(self, seconds: float) -> dict[str, float]:
        time.sleep(seconds)
        self.after = rss_mib(self.processes)
        return self.after

    def rows(self) -> dict[str, dict[str, float]]:
        return {name: {"before": round(self.before[name], 1), "peak": round(self.peak[name], 1),
                       "after": round((self.after or self.peak)[name], 1)} for name in self.processes}

    def worst(self, key: str) -> tuple[str, float]:
        """The process that grew most (peak or after, over before), and by how many MiB."""
        other = self.peak if key == "peak" else self.after
        name = max(self.processes, key=lambda n: other[n] - self.before[n])
        return name, other[name] - self.before[name]


# -- a client that streams a large body -----------------------------------------------------------------
@dataclass
class Answer:
    status: int | None  # None: no answer (the connection was closed first)
    seconds: float  # from the first byte sent to the answer's status line (or the close)
    sent: int  # body bytes the client got to send
    body: str = ""
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen first (100 Continue)
    error: str = ""


def _read_answer(sock: socket.socket, timeout: float) -> tuple[list[int], int | None, str]:
    """(interim statuses, final status, final body) read from the socket."""
    sock.settimeout(timeout)
    buf, interim = b"", []
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return interim, None, ""
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200:
            interim.append(status)
            continue
        lines = (line.partition(b":") for line in head.split(b"\r\n")[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in lines}
        chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        length = int(headers.get(b"content-length", b"0") or 0)
        sock.settimeout(5)
        try:
            while (b"\r\n0\r\n\r\n" not in b"\r\n" + buf) if chunked else len(buf) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        if chunked:  # the chunks' data, without their sizes
            data, rest = b"", buf
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size.split(b";")[0] or b"0", 16)
                if n == 0:
                    break
                data, rest = data + rest[:n], rest[n + 2:]
            return interim, status, data.decode("utf-8", "replace")
        return interim, status, buf[:length].decode("utf-8", "replace")


def send_body(url: str, path: str, prefix: bytes, size: int, suffix: bytes, mode: str = "length",
              timeout: float = 120.0) -> Answer:
    """POST prefix + `size` filler bytes + suffix, streamed. mode: "length" (Content-Length),
    "expect" (Content-Length and Expect: 100-continue; the body only after 100 Continue), or
    "chunked" (Transfer-Encoding: chunked, 1 MiB chunks)."""
    host, port = url.rsplit(":", 1)
    total = len(prefix) + size + len(suffix)
    headers = [f"POST {path} HTTP/1.1", f"Host: {url}", "Content-Type: application/json"]
    headers += ["Transfer-Encoding: chunked"] if mode == "chunked" else [f"Content-Length: {total}"]
    if mode == "expect":
        headers.append("Expect: 100-continue")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sent, stop, failure = [0], threading.Event(), []

    def pieces():
        yield prefix
        left = size
        while left > 0:
            yield BLOCK[:min(left, MiB)]
            left -= MiB
        yield suffix

    def write():
        try:
            for piece in pieces():
                if stop.is_set():
                    return
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if mode == "chunked" else piece)
                sent[0] += len(piece)
            if mode == "chunked" and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError as exc:
            failure.append(f"{type(exc).__name__}: {exc}")

    start = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    try:
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        if mode == "expect":  # as curl: wait for 100 Continue (or a final answer) before the body
            sock.settimeout(timeout)
            first = sock.recv(65536)
            if first.startswith(b"HTTP/1.1 100"):
                writer.start()
                interim, status, body = _read_answer(sock, timeout)
                interim = [100, *interim]
            else:
                extra = _SocketPrefix(sock, first)
                interim, status, body = _read_answer(extra, timeout)
        else:
            writer.start()
            interim, status, body = _read_answer(sock, timeout)
    except OSError as exc:
        return Answer(None, time.monotonic() - start, sent[0], error=f"{type(exc).__name__}: {exc}")
    finally:
        seconds = time.monotonic() - start
        stop.set()
        sock.close()
        if writer.is_alive() or writer.ident:
            writer.join(10)
    return Answer(status, seconds, sent[0], body, interim, failure[0] if failure else "")


class _SocketPrefix:
    """A socket whose first recv returns bytes already read."""

    def __init__(self, sock, first: bytes):
        self.sock, self.first = sock, first

    def settimeout(self, t):
        self.sock.settimeout(t)

    def recv(self, n):
        if self.first:
            out, self.first = self.first, b""
            return out
        return self.sock.recv(n)


def chat_body(image_bytes: int) -> tuple[bytes, bytes]:
    """(prefix, suffix) of a chat request whose one image data URL carries `image_bytes` of base64."""
    prefix = (b'{"model": "qwen3vl", "max_tokens": 4, "messages": [{"role": "user", "content": ['
              b'{"type": "image_url", "image_url": {"url": "data:image/png;base64,')
    return prefix, b'"}}, {"type": "text", "text": "What is it?"}]}]}'


def generate_body() -> tuple[bytes, bytes]:
    """(prefix, suffix) of a Triton generate_stream request whose one image is the filler."""
    return b'{"text_input": "What is it?", "max_tokens": 4, "image": ["', b'"]}'


# -- slow clients -------------------------------------------------------------------------------------
def slow_clients(url: str, count: int = 200, kind: str = "headers", watch: float = 20.0,
                 interval: float = 1.0) -> dict:
    """`count` connections that dribble one byte every `interval` s: of their headers ("headers") or
    of a declared 1 MiB body ("body"). Returns how many the server closed within `watch` s, and when."""
    import selectors

    host, port = url.rsplit(":", 1)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url}\r\n".encode()
    if kind == "body":
        head += b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{"
    socks, refused = [], 0
    for _ in range(count):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(head)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            refused += 1
    start = time.monotonic()
    closed_at = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    next_byte = start + interval
    try:
        while time.monotonic() - start < watch and len(closed_at) < len(socks):
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server (an answer may have come before)
                    closed_at[s] = time.monotonic() - start
                    sel.unregister(s)
            if time.monotonic() >= next_byte:
                next_byte += interval
                for s in socks:
                    if s not in closed_at:
                        try:
                            s.send(b"X" if kind == "headers" else b" ")
                        except OSError:
                            pass
    finally:
        for s in socks:
            s.close()
    times = sorted(closed_at.values())
    return {"connections": count, "refused_at_connect": refused, "closed": len(times), "watched_s": watch,
            "first_closed_s": round(times[0], 2) if times else None,
            "last_closed_s": round(times[-1], 2) if times else None}


# -- the cases -----------------------------------------------------------------------------------------
CASES = {
    # name: (endpoint, body mode, filler bytes, concurrent clients)
    "openai 200 MiB": ("openai", "length", 200 * MiB, 1),
    "openai 200 MiB, Expect: 100-continue": ("openai", "expect", 200 * MiB, 1),
    "openai 200 MiB, chunked": ("openai", "chunked", 200 * MiB, 1),
    "openai 60 MiB, image over its limit": ("openai", "length", 60 * MiB, 1),
    "openai burst: 4 x 200 MiB": ("openai", "length", 200 * MiB, 4),
    "openai burst: 4 x 60 MiB": ("openai", "length", 60 * MiB, 4),
    "triton http 60 MiB, image over its limit": ("triton", "length", 60 * MiB, 1),
    "triton http 200 MiB": ("triton", "length", 200 * MiB, 1),
}


def run_case(name: str, urls: dict, processes: dict, settle: float) -> dict:
    endpoint, mode, size, clients = CASES[name]
    if endpoint == "openai":
        path, (prefix, suffix) = "/v1/chat/completions", chat_body(size)
    else:
        path, (prefix, suffix) = "/v2/models/qwen3vl/generate_stream", generate_body()
    answers = [None] * clients
    with MemoryWatch(processes) as mem:
        def one(i):
            answers[i] = send_body(urls[endpoint], path, prefix, size, suffix, mode)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        time.sleep(0.5)  # what follows the answer (freeing, a drained connection) is still watched
    mem.settle(settle)
    first = answers[0]
    return {"case": name, "status": [a.status for a in answers], "interim": first.interim,
            "seconds": round(max(a.seconds for a in answers), 3), "sent_mib": round(first.sent / MiB, 1),
            "message": first.body[:300], "client_error": first.error, "memory_mib": mem.rows(),
            "worst_peak": mem.worst("peak"), "worst_after": mem.worst("after")}


def table(report: dict) -> str:
    lines = [f"{'case':<44} {'status':>8} {'time s':>8} {'sent MiB':>9} {'peak +MiB (worst)':>30} "
             f"{'after +MiB (worst)':>30}"]
    for r in report["cases"]:
        peak, after = r["worst_peak"], r["worst_after"]
        status = ",".join(str(s) for s in sorted(set(r["status"]), key=str))
        lines.append(f"{r['case']:<44} {status:>8} {r['seconds']:>8.2f} {r['sent_mib']:>9.1f} "
                     f"{f'{peak[1]:+.0f} ({peak[0]})':>30} {f'{after[1]:+.0f} ({after[0]})':>30}")
    for r in report["cases"]:
        lines.append(f"\n{r['case']}: {r['message'][:200]!r}" + (f" interim {r['interim']}" if r["interim"] else ""))
        for proc, row in r["memory_mib"].items():
            lines.append(f"    {proc:<28} before {row['before']:8.1f}  peak {row['peak']:8.1f}  "
                         f"after {row['after']:8.1f}")
    for kind, r in report.get("slow", {}).items():
        lines.append(f"\nslow clients ({kind}): {r}")
    return "\n".join(lines)


def start(checkpoint: Path, build: Path, s, log=print):
    """tritonserver (topology single) and the OpenAI endpoint with settings `s`."""
    from qwen3vl_triton.serve.repository import render
    from qwen3vl_triton.serve.server import OpenAIServer, Ports, TritonServer, free_ports

    repo = render(checkpoint, build / "repository", topology="single", settings=s)
    triton = TritonServer(repo, Ports(*free_ports(3)), build_dir=build, log_file=build / "tritonserver.log",
                          extra_args=["--exit-timeout-secs=5"])
    log("starting tritonserver ...")
    triton.start(timeout=600, log=lambda *_: None)
    log("starting the OpenAI endpoint ...")
    openai = OpenAIServer(triton.grpc_url, "127.0.0.1", free_ports(1)[0], s, log_file=build / "openai.log").start()
    return triton, openai


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.front_doors", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="default: the tiny checkpoint (checkpoints/tiny, built if missing)")
    ap.add_argument("--build", default=str(ROOT / "build" / "front-doors"))
    ap.add_argument("--cases", default="all", help="all, openai, triton, or a comma-separated list of names")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after each answer before 'after'")
    ap.add_argument("--slow", type=int, default=200, help="slow connections per kind (0: skip)")
    ap.add_argument("--slow-watch", type=float, default=20.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a serving setting")
    args = ap.parse_args(argv)

    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.serve.launcher import settings_from

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "tiny")
    settings = settings_from(["max_output_len=64", "max_seq_len=1024", *args.set])
    names = list(CASES) if args.cases == "all" else [n for n in CASES if CASES[n][0] == args.cases] \
        if args.cases in ("openai", "triton") else [n.strip() for n in args.cases.split(",")]
    triton, openai = start(checkpoint, Path(args.build), settings)
    report = {"cases": [], "slow": {}}
    try:
        urls = {"openai": openai.url, "triton": triton.http_url}
        processes = server_processes(triton, openai)
        time.sleep(2)
        for name in names:
            print(f"{name} ...", flush=True)
            report["cases"].append(run_case(name, urls, processes, args.settle))
        if args.slow:
            for kind in ("headers", "body"):
                for endpoint in ("openai", "triton"):
                    print(f"{args.slow} slow clients ({kind}) on {endpoint} ...", flush=True)
                    report["slow"][f"{endpoint} {kind}"] = slow_clients(urls[endpoint], args.slow, kind,
                                                                        args.slow_watch)
    finally:
        openai.stop()
        triton.stop()
    print(table(report))
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "front-doors-latest.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
