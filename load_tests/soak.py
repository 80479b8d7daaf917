"""Soak: many sequences through both paths at once -- the `qwen3vl` ensemble and the disaggregated
encoder + language servers -- mixing good, malformed, cancelled and abandoned requests with transfer
faults, while every server process is watched.

    python -m load_tests.soak                       # 1,000 sequences, servers started here (make soak)
    python -m load_tests.soak --sequences 120       # the short run `make test` does

Good requests are compared with their solo runs: each job is first run alone, greedy, through each
path, and every good request must give exactly that text. The report (printed, and written as JSON
to load_tests/reports/soak-latest.json) counts wrong outputs and failed good requests -- both must
be 0 -- and shows, for every server process (tritonserver and each Python-backend stub), its
memory (RSS), threads, file descriptors and open shared-memory files at the start (after the solo
runs), in the middle and at the end (after abandoned sequences have expired), plus the regions
Triton has registered and the sequences the language model holds. Only public interfaces are used:
the ensemble's tensors over gRPC, and the disaggregated client (qwen3vl_triton/transfer/sender.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "load_tests" / "reports"
IDLE_US = 3_000_000  # the language server's idle timeout: abandoned sequences expire within the run


# -- the workload -----------------------------------------------------------------------------------
def _image(w: int, h: int, seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Job:
    prompt: str
    images: tuple[bytes, ...]
    max_tokens: int


JOBS = [
    Job("Describe this image in short.", (_image(96, 64, 1),), 10),
    Job("Compare the two images.", (_image(64, 96, 2), _image(80, 80, 3)), 8),
    Job("Tell me about the ocean.", (), 12),
    Job("What is in the picture?", (_image(128, 48, 4),), 6),
]

# kind -> weight; good kinds are compared with the solo runs
KINDS = {
    "qwen3vl good": 18, "qwen3vl malformed": 6, "qwen3vl cancelled": 6,
    "disagg good grpc": 12, "disagg good shm": 12, "disagg transfer fault": 10, "disagg resumed stream": 6,
    "disagg malformed": 10, "disagg cancelled (END)": 8, "disagg abandoned": 6, "disagg takeover": 6,
}
GOOD = {"qwen3vl good", "disagg good grpc", "disagg good shm", "disagg transfer fault", "disagg resumed stream"}


class Wrong(AssertionError):
    """A good request got an output that differs from its solo run."""


class Unexpected(AssertionError):
    """A bad or cancelled request was not answered as it should be."""


# -- clients ------------------------------------------------------------------------------------------
def infer_input(name, array):
    from qwen3vl_triton.clients.grpc_stream import infer_input as t

    return t(name, array)


def ensemble_inputs(job: Job, max_tokens: int | None = None, images=None) -> list:
    inputs = [infer_input("text_input", np.array([[job.prompt.encode()]], dtype=np.object_)),
              infer_input("max_tokens", np.array([[job.max_tokens if max_tokens is None else max_tokens]], np.int32)),
              infer_input("stream", np.array([[True]]))]
    images = job.images if images is None else images
    if images:
        inputs.append(infer_input("image", np.array([list(images)], dtype=np.object_)))
    return inputs


def ensemble_text(stream, inputs, stop_after: int | None = None) -> str:
    """The streamed text of one qwen3vl request (the first `stop_after` responses only, if set)."""
    pieces = []
    rid = stream.submit("qwen3vl", inputs)
    for n, r in enumerate(stream.results(rid, "qwen3vl"), 1):
        out = r.as_numpy("text_output")
        if out is not None:
            pieces.append("".join(x.decode() for x in out.reshape(-1)))
        if stop_after is not None and n >= stop_after:
            stream.forget(rid)
            break
    return "".join(pieces)


class Worker:
    """One client: its own gRPC stream to the single server and its own disaggregated senders
    (one per transport), reused for every sequence it drives, as a real client would."""

    def __init__(self, urls: dict, timeout: float = 120.0):
        from qwen3vl_triton.clients.grpc_stream import GrpcStream
        from qwen3vl_triton.transfer.sender import Disaggregated

        self.urls, self.timeout = urls, timeout
        self.stream = GrpcStream(urls["single"], timeout)
        self.grpc = Disaggregated(urls["encoder"], urls["language"], transport="grpc", chunk_rows=8, timeout=timeout)
        self.shm = Disaggregated(urls["encoder"], urls["language"], transport="shm", chunk_rows=16, timeout=timeout)

    def close(self):
        self.stream.close()
        self.grpc.close()
        self.shm.close()

    def fresh_stream(self):
        """After a cancel the stream is gone: a new one, as a client reconnecting."""
        from qwen3vl_triton.clients.grpc_stream import GrpcStream

        self.stream.close(cancel=True)
        self.stream = GrpcStream(self.urls["single"], self.timeout)

    def fresh_language(self, d):
        """A new stream on the sender's language connection (its pool's, shared by the other requests:
        the channel stays open), as a client reconnecting after a cancel."""
        d.lang.reconnect()


def _corrid() -> int:
    return secrets.randbits(62) + 1


def _expect_error(fn, *needles) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- checked below
        msg = str(exc)
        if not any(n in msg for n in needles):
            raise Unexpected(f"refused with {msg!r}, expected one of {needles}") from None
        return msg
    raise Unexpected(f"accepted, expected a refusal naming one of {needles}")


def run_one(kind: str, job: Job, w: Worker, solo: dict, rng: random.Random) -> None:
    """Drive one sequence of `kind`; raise Wrong or Unexpected (or any error) when it goes wrong."""
    from qwen3vl_triton.clients.grpc_stream import infer_input as t
    from qwen3vl_triton.transfer.sender import LanguageClient, TransferError

    expected = solo["qwen3vl" if kind.startswith("qwen3vl") else "disagg"][job]
    if kind == "qwen3vl good":
        text = ensemble_text(w.stream, ensemble_inputs(job))
        if text != expected:
            raise Wrong(f"qwen3vl: {text!r} != solo {expected!r}")
    elif kind == "qwen3vl malformed":
        bad = rng.choice(["image", "max_tokens"])
        if bad == "image":
            _expect_error(lambda: ensemble_text(w.stream, ensemble_inputs(job, images=(b"not an image",))), "image")
        else:
            _expect_error(lambda: ensemble_text(w.stream, ensemble_inputs(job, max_tokens=0)), "max_tokens")
    elif kind == "qwen3vl cancelled":
        ensemble_text(w.stream, ensemble_inputs(job), stop_after=1)
        w.fresh_stream()  # the client goes away mid-stream: its requests are cancelled
    elif kind in ("disagg good grpc", "disagg good shm"):
        d = w.grpc if kind.endswith("grpc") else w.shm
        text = "".join(d.generate(job.prompt, list(job.images), job.max_tokens))
        if text != expected:
            raise Wrong(f"{kind}: {text!r} != solo {expected!r}")
    elif kind == "disagg transfer fault":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        fault = rng.choice(["drop", "duplicate", "reorder"])
        dropped = set()

        def plan(start, count):
            if fault == "duplicate":
                return [(start, count), (start, count)]
            if fault == "reorder" and start + count < enc.rows:
                return [(start + count, min(count, enc.rows - start - count)), (start, count)]
            if fault == "drop" and start == count and start not in dropped:  # the second chunk, once
                dropped.add(start)
                return [(start + count, min(count, enc.rows - start - count))] if start + count < enc.rows else []
            return [(start, count)]

        cid = _corrid()
        try:
            d.transfer(cid, enc, job.max_tokens, plan=plan)
            text = "".join(x for x, _ in d.stream(cid))
        finally:
            d.lang.end(cid)
        if text != expected:
            raise Wrong(f"transfer with a {fault} fault: {text!r} != solo {expected!r}")
    elif kind == "disagg resumed stream":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        cid = _corrid()
        try:
            d.transfer(cid, enc, job.max_tokens)
            first, got = [], 0
            for text, ids in d.lang.generate(cid):
                first.append(text)
                got += len(ids)
                if got >= 1:
                    break  # the stream breaks here
            w.fresh_language(d)
            rest = [x for x, _ in d.lang.generate(cid, from_token=got)]
        finally:
            d.lang.end(cid)
        if "".join(first + rest) != expected:
            raise Wrong(f"resumed stream: {''.join(first + rest)!r} != solo {expected!r}")
    elif kind == "disagg malformed":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        cid = _corrid()
        bad = rng.choice(["delta", "op", "gap", "secret", "from_token"])
        if bad == "delta":
            wild = enc.__class__(**{**enc.__dict__, "mrope_delta": 2**62})
            _expect_error(lambda: d.lang.start(cid, wild, job.max_tokens), "mrope_position_deltas: must be in")
            return
        d.lang.start(cid, enc, job.max_tokens, reuse_rows=False)  # every row to send: received_rows 0
        try:
            if bad == "op":
                rid = d.lang.stream.submit("language", [t("op", np.array([[b"\xff\xfe"]], dtype=np.object_))],
                                           sequence_id=cid)
                _expect_error(lambda: list(d.lang.stream.results(rid)), "op: must be UTF-8 text")
            elif bad == "gap":
                _expect_error(lambda: d.lang.chunk(cid, 4, [t("chunk", enc.table[None, 4:8])]),
                              "chunk_offset: 4 is past received_rows=0")
            elif bad == "secret":
                src = w.shm.source(enc)
                forged = [x for x in src.rows(0, 4) if x.name() != "region_secret"]
                forged.append(t("region_secret", np.array([[secrets.token_hex(32).encode()]], dtype=np.object_)))
                _expect_error(lambda: d.lang.chunk(cid, 0, forged), "region_secret: does not match region")
            else:
                _expect_error(lambda: list(d.lang.generate(cid, from_token=10**6)), "generate refused: received_rows=0")
                d.lang.chunk(cid, 0, [t("chunk", enc.table[None])])
                list(d.lang.generate(cid))
                _expect_error(lambda: list(d.lang.generate(cid, from_token=10**6)), "from_token: must be in")
            if d.lang.status(cid) not in (0, enc.rows):  # the sequence survived its bad request
                raise Unexpected("the sequence changed after a refused request")
        finally:
            d.lang.end(cid)
    elif kind == "disagg cancelled (END)":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        cid = _corrid()
        d.transfer(cid, enc, job.max_tokens)
        stream = d.lang.generate(cid)
        next(stream, None)
        d.lang.end(cid)
        try:
            for _ in stream:
                pass
        except TransferError as exc:  # a generation still running when END came is cancelled
            if "generation cancelled" not in str(exc):
                raise Unexpected(f"END during a generation: {exc}") from None
    elif kind == "disagg abandoned":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        cid = _corrid()
        d.lang.start(cid, enc, job.max_tokens)
        d.lang.chunk(cid, 0, [t("chunk", enc.table[None, :4])])
        # ... and the client walks away: the server expires the sequence after its idle timeout
    elif kind == "disagg takeover":
        d = w.grpc
        enc = d.encode(job.prompt, list(job.images), job.max_tokens)
        cid = _corrid()
        other = LanguageClient(w.urls["language"], timeout=w.timeout)
        try:
            d.transfer(cid, enc, job.max_tokens)
            first = d.lang.generate(cid)
            next(first, None)
            text = "".join(x for x, _ in other.generate(cid))  # a second generate takes the stream over
            if text != expected:
                raise Wrong(f"takeover stream: {text!r} != solo {expected!r}")
            try:
                for _ in first:
                    pass
            except TransferError as exc:
                if "generate stream replaced" not in str(exc):
                    raise Unexpected(f"the replaced stream ended with {exc}") from None
        finally:
            other.end(cid)
            other.close(cancel=True)
            w.fresh_language(d)
    else:
        raise ValueError(kind)


# -- the servers and their processes ----------------------------------------------------------------
def start_servers(checkpoint: Path, build: Path, log=print) -> dict:
    from qwen3vl_triton.serve.cpu_engine import render_prepared
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.serve.server import Ports, TritonServer, free_ports

    servers = {}
    for name, topology, extra in (("single", "single", {}), ("encoder", "encoder", {}),
                                  ("language", "language", {"sequence_idle_us": IDLE_US})):
        settings = Settings(max_output_len=64, max_seq_len=1024, max_image_pixels=1_000_000, **extra)
        repo, _ = render_prepared(checkpoint, build / name / "repository", build, settings, topology=topology,
                                  log=lambda *_: None)
        srv = TritonServer(repo, Ports(*free_ports(3)), build_dir=build / name, log_file=build / f"{name}.log",
                           extra_args=["--exit-timeout-secs=5"])
        log(f"starting the {name} server ...")
        servers[name] = srv.start(timeout=600, log=lambda *_: None)
    return servers


def _shm_files(p: psutil.Process) -> int:
    """Distinct /dev/shm files the process maps or holds open."""
    names = set()
    try:
        names |= {m.path for m in p.memory_maps(grouped=True) if m.path.startswith("/dev/shm/")}
        names |= {f.path for f in p.open_files() if f.path.startswith("/dev/shm/")}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return len(names)


def _label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.NoSuchProcess:
        return "gone"
    if cmd and cmd[0].endswith("triton_python_backend_stub"):  # its first argument: <repo>/<model>/1/model.py
        return f"stub {Path(cmd[1]).parent.parent.name}" if len(cmd) > 1 else "stub"
    return "tritonserver"


def snapshot(servers: dict) -> dict:
    """Per server process: RSS (MiB), threads, file descriptors, /dev/shm files; per server: the
    regions Triton has registered, and the language model's gauges."""
    from qwen3vl_triton.serve import admin

    out = {}
    for name, srv in servers.items():
        procs = [psutil.Process(srv.process.pid), *srv.children()]
        rows = {}
        for p in procs:
            try:
                with p.oneshot():
                    rows[f"{_label(p)} ({p.pid})"] = {
                        "rss_mib": round(p.memory_info().rss / 2**20, 1), "threads": p.num_threads(),
                        "fds": p.num_fds(), "shm_files": _shm_files(p)}
            except psutil.NoSuchProcess:
                rows[f"gone ({p.pid})"] = None
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(srv.grpc_url) as c:
            registered = len(c.get_system_shared_memory_status(headers=admin.grpc_headers(srv.admin_key),
                                                               as_json=True).get("regions", {}))
        out[name] = {"processes": rows, "registered_regions": registered}
        if name == "language":
            out[name]["language"] = {g: _metric(srv, f"qwen3vl_language_{g}", "language")
                                     for g in ("sequences", "regions", "state_bytes")}
    return out


def _metric(server, name, model) -> float:
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://{server.address}:{server.ports.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.e+-]+)$', text, re.M))


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Tally:
    count: collections.Counter = field(default_factory=collections.Counter)
    wrong: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind, error=None):
        with self.lock:
            self.count[kind] += 1
            if error is None:
                return
            (self.wrong if isinstance(error, Wrong) else self.failed)[kind] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{kind}: {type(error).__name__}: {error}")


def solo_runs(servers: dict, log=print) -> dict:
    """Each job alone, through the ensemble and through the disaggregated path: the reference
    text of every good request of that path; both paths see their stream end, so they give the
    same text (a character that max_tokens cuts in two ends both as U+FFFD)."""
    from qwen3vl_triton.clients.grpc_stream import GrpcStream
    from qwen3vl_triton.transfer.sender import Disaggregated

    solo = {"qwen3vl": {}, "disagg": {}}
    stream = GrpcStream(servers["single"].grpc_url, 120)
    try:
        with Disaggregated(servers["encoder"].grpc_url, servers["language"].grpc_url) as d:
            for job in JOBS:
                a = solo["qwen3vl"][job] = ensemble_text(stream, ensemble_inputs(job))
                b = solo["disagg"][job] = "".join(d.generate(job.prompt, list(job.images), job.max_tokens))
                if a != b:
                    raise Wrong(f"solo runs disagree for {job.prompt!r}: qwen3vl {a!r}, disaggregated {b!r}")
    finally:
        stream.close()
    log(f"solo runs: {len(JOBS)} jobs through both paths")
    return solo


def soak(servers: dict, sequences: int = 1000, workers: int = 6, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    plan = [(rng.choices(kinds, weights)[0], rng.choice(JOBS), rng.randrange(2**31)) for _ in range(sequences)]
    solo = solo_runs(servers, log)
    snaps = {"start": snapshot(servers)}
    tally, done = Tally(), [0]
    next_item, lock, middle = iter(plan), threading.Lock(), threading.Event()
    urls = {name: srv.grpc_url for name, srv in servers.items()}
    t0 = time.monotonic()

    def work():
        w = Worker(urls)
        try:
            while True:
                with lock:
                    item = next(next_item, None)
                if item is None:
                    return
                kind, job, item_seed = item
                try:
                    run_one(kind, job, w, solo, random.Random(item_seed))
                    tally.add(kind)
                except Exception as exc:  # noqa: BLE001 -- counted and reported
                    tally.add(kind, exc)
                    w.fresh_stream()
                    w.fresh_language(w.grpc)
                    w.fresh_language(w.shm)
                with lock:
                    done[0] += 1
                    n = done[0]
                if n == sequences // 2:
                    middle.set()
                if n % 100 == 0:
                    log(f"{n}/{sequences} sequences, {time.monotonic() - t0:.0f}s")
        finally:
            w.close()

    threads = [threading.Thread(target=work, name=f"soak-{i}") for i in range(workers)]
    for th in threads:
        th.start()
    middle.wait()
    snaps["middle"] = snapshot(servers)
    for th in threads:
        th.join()
    seconds = time.monotonic() - t0
    # abandoned sequences expire on the language server's idle clock
    deadline = time.monotonic() + 4 * IDLE_US / 1e6 + 10
    while time.monotonic() < deadline and _metric(servers["language"], "qwen3vl_language_sequences", "language"):
        time.sleep(0.5)
    time.sleep(1.0)
    snaps["end"] = snapshot(servers)
    good = sum(tally.count[k] for k in GOOD)
    # a server one of whose processes died: the end of its log (a stub's fatal signal and stacks)
    died = {name: servers[name].log_tail(60) for name in servers
            if any(v is None for v in snaps["end"][name]["processes"].values())
            or set(snaps["end"][name]["processes"]) != set(snaps["start"][name]["processes"])}
    return {
        "sequences": sequences, "workers": workers, "seconds": round(seconds, 1), "seed": seed,
        "by_kind": {k: {"count": tally.count[k], "wrong": tally.wrong[k], "failed": tally.failed[k]} for k in KINDS},
        "good_requests": good,
        "wrong_outputs": sum(tally.wrong.values()),
        "failed_good_requests": sum(tally.failed[k] for k in GOOD),
        "mishandled_bad_requests": sum(tally.failed[k] for k in KINDS if k not in GOOD),
        "examples": tally.examples,
        "snapshots": snaps,
        "growth": growth(snaps),
        "logs_of_servers_with_a_process_gone": died,
    }


# RSS may grow by allocator noise and warm caches; threads, descriptors and shm files must return
LIMITS = {"rss_mib": 64.0, "threads": 4, "fds": 8, "shm_files": 2}


def growth(snaps: dict) -> dict:
    """Per process, end minus start of each figure, and whether it is within LIMITS."""
    out = {}
    for server, snap in snaps["start"].items():
        for proc, start in snap["processes"].items():
            end = snaps["end"][server]["processes"].get(proc)
            if start is None or end is None:
                out[f"{server}: {proc}"] = {"ok": False, "note": "process gone"}
                continue
            delta = {k: round(end[k] - start[k], 1) for k in LIMITS}
            out[f"{server}: {proc}"] = {**delta, "ok": all(delta[k] <= LIMITS[k] for k in LIMITS)}
        for key in ("registered_regions",):
            d = snaps["end"][server][key] - snap[key]
            out[f"{server}: {key}"] = {"delta": d, "ok": d <= 0}
    lang = snaps["end"].get("language", {}).get("language")
    if lang is not None:
        out["language: sequences and regions held at the end"] = {
            **lang, "ok": lang["sequences"] == 0 and lang["regions"] == 0 and lang["state_bytes"] == 0}
    return out


def verdict(report: dict) -> list[str]:
    """What is wrong with a soak report (empty: it passed)."""
    problems = []
    if report["wrong_outputs"]:
        problems.append(f"{report['wrong_outputs']} wrong outputs")
    if report["failed_good_requests"]:
        problems.append(f"{report['failed_good_requests']} failed good requests")
    if report["mishandled_bad_requests"]:
        problems.append(f"{report['mishandled_bad_requests']} bad, cancelled or abandoned requests answered wrongly")
    problems += [f"{name} grew: {g}" for name, g in report["growth"].items() if not g["ok"]]
    return problems


def table(report: dict) -> str:
    lines = [f"{report['sequences']} sequences, {report['workers']} workers, {report['seconds']} s",
             f"{'kind':<26}{'count':>7}{'wrong':>7}{'failed':>8}"]
    for kind, c in report["by_kind"].items():
        lines.append(f"{kind:<26}{c['count']:>7}{c['wrong']:>7}{c['failed']:>8}")
    lines.append(f"wrong outputs {report['wrong_outputs']}, failed good requests {report['failed_good_requests']} "
                 f"(of {report['good_requests']}), mishandled others {report['mishandled_bad_requests']}")
    lines.append("")
    lines.append(f"{'process (start/middle/end)':<44}{'RSS MiB':>26}{'threads':>14}{'fds':>14}{'shm':>10}")
    snaps = report["snapshots"]
    for server, snap in snaps["start"].items():
        for proc in snap["processes"]:
            vals = [snaps[s][server]["processes"].get(proc) for s in ("start", "middle", "end")]
            if any(v is None for v in vals):
                lines.append(f"{server + ': ' + proc:<44} gone")
                continue

            def col(k, width):
                return f"{'/'.join(str(v[k]) for v in vals):>{width}}"

            lines.append(f"{server + ': ' + proc:<44}{col('rss_mib', 26)}{col('threads', 14)}{col('fds', 14)}"
                         f"{col('shm_files', 10)}")
        lines.append(f"{server + ': Triton-registered regions':<44}"
                     f"{'/'.join(str(snaps[s][server]['registered_regions']) for s in ('start', 'middle', 'end')):>26}")
    lang = [snaps[s]["language"]["language"] for s in ("start", "middle", "end")]
    lines.append(f"{'language: sequences / regions held':<44}"
                 f"{'/'.join(str(int(x['sequences'])) for x in lang):>26}"
                 f"{'/'.join(str(int(x['regions'])) for x in lang):>14}")
    problems = verdict(report)
    lines.append("")
    lines.append("PASS" if not problems else "FAIL: " + "; ".join(problems))
    if problems and report["examples"]:
        lines += ["", "first errors:", *report["examples"]]
    for server, tail in report.get("logs_of_servers_with_a_process_gone", {}).items():
        lines += ["", f"{server} server's log (end):", tail]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sequences", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=6, help="clients driving sequences at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the tiny one, built if missing)")
    ap.add_argument("--build-dir", default="build/soak")
    ap.add_argument("--report", default=str(REPORTS / "soak-latest.json"))
    args = ap.parse_args(argv)

    from qwen3vl_triton.model.tiny import ensure_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "tiny")
    servers = start_servers(checkpoint, Path(args.build_dir).resolve())
    try:
        report = soak(servers, args.sequences, args.workers, args.seed)
    finally:
        for srv in servers.values():
            srv.stop()
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"report: {args.report}")
    return 0 if not verdict(report) else 1


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
