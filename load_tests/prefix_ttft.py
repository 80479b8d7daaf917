"""Prefix KV reuse, measured: time to the first token of a conversation's second turn against its
first, served over HTTP against llama.cpp's own server on the same conversations, or in process.

    make bench-prefix     # = python -m load_tests.prefix_ttft --served --llamacpp
    python -m load_tests.prefix_ttft --served --llamacpp --rounds 7 --json out.json
    python -m load_tests.prefix_ttft --served --openai-url 127.0.0.1:9000 --metrics-url 127.0.0.1:8002
    python -m load_tests.prefix_ttft                         # in process: the engine, cache on and off
    python -m load_tests.prefix_ttft --breakdown             # in process: where turn 2's time goes

Each round is a new conversation with a new image (seeded): turn 1 is the image and a question;
turn 2 is turn 1, its answer as the server streamed it, and a follow-up question. Each side
continues its own conversation (its own answer), as a chat client does; both sides' answers are
greedy on the same weights, and the report says whether they were the same text.

Over HTTP (`--served`, `--llamacpp`): the served stack is the `qwen3vl` ensemble (topology
single, the ggml runner in float32; preprocessing's pixel cache, the vision encoder's image
cache and the engine's prefix cache on: `kv_cache_bytes`) behind its OpenAI endpoint, as
`qwen3vl-serve --openai-port` runs it; llama.cpp is `llama-server` (bench_llamacpp: the same
start and request code as the bench) on the f32 GGUF files of the same checkpoint, with its
prompt cache on (`cache_prompt: true`, `--cache-ram` the same bytes as `kv_cache_bytes`), the
threads the served engine takes and its KV cells (f32, plain attention: `bench_llamacpp.peer_kv`).
Both are driven by one client (bench_llamacpp.LlamaCppSession: HTTP/1.1, server-sent events, the
image as a data URL), streamed, greedy, and the time to first token is taken at the first
streamed chunk with content text on each side. The sides take turns
request by request (turn 1 of one, turn 1 of the other, turn 2 of one, turn 2 of the other;
which side goes first swaps every round), so the host's load reaches both alike. Round 0 warms
both up and is not counted. Prompt tokens reused per turn: the served engine's
`qwen3vl_prefix_cache_hit_tokens_total`, llama-server's `timings.cache_n`.

Printed: each round, the medians, turn 2 / turn 1 on each side, served turn 2 / llama.cpp turn 2,
the issue's target (served turn 2 <= 0.3x its turn 1 and <= llama.cpp's turn 2), the machine's
rates (memory read and copy, matmul), its CPU model and features, and the host's load (the
load average at each round, other processes' share of the CPU over the run). A figure that
cannot be (a time <= 0 or not finite, more tokens reused than the prompt has, a turn 2 no
longer than its turn 1) stops the report instead of entering a ratio.

In process (default) the package's preprocessing and vision encoder (their image caches on, as
served) and two engines, prefix cache on and off; `--breakdown` times each stage of the cache-on turn 2
(messages parse, preprocessing, encoder, the prefix cache's keys and restore, the first step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTION = "Describe this image in short."
FOLLOW_UP = "What else is in it? Answer in one sentence."
SERVED, LLAMACPP = "served", "llama.cpp"
TARGET_RATIO = 0.3  # served turn 2 / its turn 1 (issue 23)
TARGET_VS_LLAMACPP = 1.0  # served turn 2 / llama.cpp's turn 2


# -- the conversation (pure) ------------------------------------------------------------------------------
def turn1_messages(image: bytes) -> list[dict]:
    """Turn 1: the image and the question, one user message (OpenAI chat messages)."""
    from client import Conversation

    return Conversation().user(QUESTION, [image]).messages


def turn2_messages(image: bytes, answer: str) -> list[dict]:
    """Turn 2: turn 1, the answer the server gave to it, and the follow-up question -- turn 1's
    messages are its first ones, unchanged, so turn 1's KV is a prefix of turn 2's."""
    from client import Conversation

    if not isinstance(answer, str):
        raise TypeError(f"answer: expected the text of turn 1's answer, got {type(answer).__name__}")
    return Conversation(turn1_messages(image)).assistant(answer).user(FOLLOW_UP).messages


def served_body(messages: list[dict], max_tokens: int) -> dict:
    """The served OpenAI endpoint's request: streamed, greedy, usage in the last chunk."""
    return {"model": "qwen3vl", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}


def llamacpp_body(messages: list[dict], max_tokens: int) -> dict:
    """llama-server's: the same, with its prompt cache (`cache_prompt`) and its end of generation
    as the served side's (no `ignore_eos`)."""
    from load_tests.bench_llamacpp import messages_body

    return messages_body(messages, max_tokens, ignore_eos=False, cache_prompt=True)


# -- figures (pure) -------------------------------------------------------------------------------------
class ImpossibleFigure(ValueError):
    """A measured figure that cannot be: it must not enter a ratio."""


@dataclass
class Turn:
    ttft: float  # seconds from sending the request to its first streamed content
    prompt_tokens: int
    reused: int | None  # prompt tokens the server took from its cache (None: not known)
    text: str = ""
    load: float = float("nan")  # the host's 1-minute load average when the turn ended
    prefill_ms: float | None = None  # the server's own time prefilling the prompt (llama-server's prompt_ms)


@dataclass
class Round:
    side: str
    turn1: Turn
    turn2: Turn


def check_round(r: Round) -> None:
    """Refuse figures that cannot be (ImpossibleFigure, naming the side and the figure)."""
    for name, t in (("turn 1", r.turn1), ("turn 2", r.turn2)):
        if not (isinstance(t.ttft, (int, float)) and math.isfinite(t.ttft) and t.ttft > 0):
            raise ImpossibleFigure(f"{r.side} {name}: time to first token {t.ttft!r} s (must be finite and > 0)")
        if t.prompt_tokens <= 0:
            raise ImpossibleFigure(f"{r.side} {name}: {t.prompt_tokens} prompt tokens")
        if t.reused is not None and not 0 <= t.reused <= t.prompt_tokens:
            raise ImpossibleFigure(f"{r.side} {name}: {t.reused} tokens reused of a {t.prompt_tokens}-token prompt")
    if r.turn2.prompt_tokens <= r.turn1.prompt_tokens:
        raise ImpossibleFigure(f"{r.side}: turn 2's prompt ({r.turn2.prompt_tokens} tokens) is not longer than "
                               f"turn 1's ({r.turn1.prompt_tokens}), which it holds")


def summarize(rounds: list[Round]) -> dict:
    """Per side: medians of turn 1 and turn 2 (seconds), turn 2 / turn 1 (of the medians, and the
    median of the rounds' own ratios), reuse; across sides (when both ran): served turn 2 /
    llama.cpp turn 2 (of the medians, and the median of the rounds' paired ratios); the target."""
    for r in rounds:
        check_round(r)
    sides: dict[str, list[Round]] = {}
    for r in rounds:
        sides.setdefault(r.side, []).append(r)
    out: dict = {"sides": {}}
    for side, rs in sides.items():
        t1 = statistics.median(r.turn1.ttft for r in rs)
        t2 = statistics.median(r.turn2.ttft for r in rs)
        reused = [r.turn2.reused for r in rs if r.turn2.reused is not None]
        out["sides"][side] = {
            "rounds": len(rs), "turn1_s": t1, "turn2_s": t2, "turn2_vs_turn1": t2 / t1,
            "turn2_vs_turn1_rounds_p50": statistics.median(r.turn2.ttft / r.turn1.ttft for r in rs),
            "turn2_prompt_tokens_p50": statistics.median(r.turn2.prompt_tokens for r in rs),
            "turn2_reused_p50": statistics.median(reused) if reused else None,
            "turn2_server_prefill_ms_p50": (statistics.median(r.turn2.prefill_ms for r in rs)
                                            if all(r.turn2.prefill_ms is not None for r in rs) else None),
        }
    if SERVED in sides and LLAMACPP in sides:
        s, ll = sides[SERVED], sides[LLAMACPP]
        if len(s) != len(ll):
            raise ImpossibleFigure(f"{len(s)} served rounds against {len(ll)} llama.cpp rounds: not paired")
        out["served_vs_llamacpp_turn2"] = out["sides"][SERVED]["turn2_s"] / out["sides"][LLAMACPP]["turn2_s"]
        out["served_vs_llamacpp_turn2_rounds_p50"] = statistics.median(
            a.turn2.ttft / b.turn2.ttft for a, b in zip(s, ll))
    if SERVED in sides:
        ratio = out["sides"][SERVED]["turn2_vs_turn1"]
        vs = out.get("served_vs_llamacpp_turn2")
        out["target"] = {"turn2_vs_turn1": ratio, "turn2_vs_turn1_limit": TARGET_RATIO,
                         "served_vs_llamacpp_turn2": vs, "served_vs_llamacpp_limit": TARGET_VS_LLAMACPP,
                         "met": ratio <= TARGET_RATIO and vs is not None and vs <= TARGET_VS_LLAMACPP}
    return out


def format_round(index: int, r: Round) -> str:
    def reused(t: Turn) -> str:
        return "?" if t.reused is None else str(t.reused)

    prefill = "" if r.turn2.prefill_ms is None else f", its prefill {r.turn2.prefill_ms:.1f} ms"
    return (f"round {index} {r.side:9}: turn 1 {r.turn1.ttft * 1e3:7.1f} ms ({r.turn1.prompt_tokens} tok), "
            f"turn 2 {r.turn2.ttft * 1e3:7.1f} ms ({r.turn2.prompt_tokens} tok, {reused(r.turn2)} reused{prefill}), "
            f"turn2/turn1 {r.turn2.ttft / r.turn1.ttft:.2f}; load {r.turn2.load:.2f}")


def format_summary(s: dict) -> str:
    lines = []
    for side, f in s["sides"].items():
        lines.append(f"{side:9}: turn 1 TTFT p50 {f['turn1_s'] * 1e3:.1f} ms, turn 2 p50 {f['turn2_s'] * 1e3:.1f} ms, "
                     f"turn2/turn1 {f['turn2_vs_turn1']:.3f} (rounds' p50 {f['turn2_vs_turn1_rounds_p50']:.3f}); "
                     f"turn 2 prompt {f['turn2_prompt_tokens_p50']:.0f} tok, reused p50 "
                     f"{'?' if f['turn2_reused_p50'] is None else round(f['turn2_reused_p50'])}"
                     + ("" if f["turn2_server_prefill_ms_p50"] is None
                        else f", its own prefill of the rest p50 {f['turn2_server_prefill_ms_p50']:.1f} ms"))
    if "served_vs_llamacpp_turn2" in s:
        lines.append(f"served turn 2 / llama.cpp turn 2: {s['served_vs_llamacpp_turn2']:.3f} "
                     f"(paired rounds' p50 {s['served_vs_llamacpp_turn2_rounds_p50']:.3f})")
    if "target" in s:
        t = s["target"]
        vs = "not measured" if t["served_vs_llamacpp_turn2"] is None else f"{t['served_vs_llamacpp_turn2']:.3f}"
        lines.append(f"target (issue 23): served turn2/turn1 {t['turn2_vs_turn1']:.3f} <= {TARGET_RATIO} and served/"
                     f"llama.cpp turn 2 {vs} <= {TARGET_VS_LLAMACPP}: {'met' if t['met'] else 'missed'}")
    return "\n".join(lines)


# -- over HTTP ------------------------------------------------------------------------------------------
def counters(metrics_url: str) -> tuple[float, float]:
    """The served engine's prefix-cache hit and miss token totals."""
    from load_tests.cache_ttft import counter

    return tuple(counter(metrics_url, f"qwen3vl_prefix_cache_{k}_tokens_total") for k in ("hit", "miss"))


@dataclass
class HttpSide:
    """One server's OpenAI endpoint, driven by the bench's client; `turn` sends one request."""

    name: str
    address: tuple[str, int]
    body: object  # (messages, max_tokens) -> dict
    metrics_url: str | None = None  # the served side's /metrics (its reuse counters)

    def turn(self, messages: list[dict], max_tokens: int) -> Turn:
        from load_tests.bench_llamacpp import LlamaCppSession

        before = counters(self.metrics_url) if self.metrics_url else None
        stream = LlamaCppSession(self.address).stream(self.body(messages, max_tokens))
        if not stream.done:
            raise RuntimeError(f"{self.name}: the stream ended before [DONE]")
        ttft = stream.first_content if stream.first_content is not None else float("nan")
        reused = stream.cached_tokens if self.metrics_url is None else None
        if before is not None:  # the engine reports its counters when it goes idle: wait for this prompt's
            deadline = time.monotonic() + 5
            while True:
                hit, miss = counters(self.metrics_url)
                if hit + miss - sum(before) >= stream.prompt_tokens or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            reused = int(hit - before[0])
        return Turn(ttft, stream.prompt_tokens, reused, stream.text, os.getloadavg()[0], stream.prompt_ms)


def run_rounds(sides: list[HttpSide], rounds: int, size: int, max_tokens: int, log=print) -> list[Round]:
    """`rounds` measured rounds after one warm-up round; the sides alternate request by request,
    and which goes first swaps each round."""
    from load_tests.workload import make_image

    out: list[Round] = []
    for r in range(rounds + 1):
        image = make_image(size, size, 2000 + r)
        order = sides if r % 2 == 0 else sides[::-1]
        first = {s.name: s.turn(turn1_messages(image), max_tokens) for s in order}
        second = {s.name: s.turn(turn2_messages(image, first[s.name].text), max_tokens) for s in order}
        for s in sides:
            got = Round(s.name, first[s.name], second[s.name])
            if r:
                check_round(got)
                out.append(got)
            log(("" if r else "(warm-up) ") + format_round(r, got))
        if len(sides) == 2:
            a, b = (first[s.name].text for s in sides)
            log(f"round {r}: turn 1 answers {'equal' if a == b else 'differ'} ({len(a)} / {len(b)} characters)")
    return out


def http_main(args) -> int:
    from load_tests import bench_llamacpp as peer
    from load_tests import bench_micro as micro
    from load_tests.bench import HostLoad
    from load_tests.bench_report import cpu_features, format_machine
    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.serve.cpu_engine import engine_threads

    host = HostLoad()
    load0 = os.getloadavg()
    facts = cpu_features()
    print(f"[prefix] load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; measuring the machine's rates ...",
          flush=True)
    rates = micro.machine_rates()
    print(f"[prefix] {format_machine(rates)}; read on 1 thread {rates['read_gbps_1_thread']:.1f} GB/s", flush=True)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        checkpoint = ensure_checkpoint(checkpoint, profile="small")
    prefill, decode = engine_threads("ggml", os.cpu_count() or 1)
    build = ROOT / "build" / "prefix-ttft"
    servers, sides = [], []
    try:
        if args.served:
            if args.openai_url is None:
                from qwen3vl_triton.serve.cpu_engine import render_prepared
                from qwen3vl_triton.serve.repository import Settings
                from qwen3vl_triton.serve.server import OpenAIServer, Ports, TritonServer, free_ports

                settings = Settings(kv_cache_bytes=args.kv_cache_bytes, cpu_runner="ggml", dtype="float32")
                repo, engine = render_prepared(checkpoint, build / "repository", ROOT / "build", settings,
                                               topology="single")
                print(f"[prefix] served engine: {engine.describe()}", flush=True)
                http, grpc, metrics, port = free_ports(4)
                triton = TritonServer(repo, Ports(http, grpc, metrics), build_dir=build,
                                      log_file=build / "tritonserver.log")
                servers.append(triton)
                triton.start(timeout=900)
                openai = OpenAIServer(triton.grpc_url, "127.0.0.1", port, settings, log_file=build / "openai.log")
                servers.append(openai)
                openai.start()
                args.openai_url, args.metrics_url = f"127.0.0.1:{port}", f"127.0.0.1:{metrics}"
            host_, port_ = args.openai_url.rsplit(":", 1)
            sides.append(HttpSide(SERVED, (host_, int(port_)), served_body, args.metrics_url))
        if args.llamacpp:
            from builders.llamacpp import build as llama_build
            from builders.llamacpp import convert

            binary = llama_build.ensure_server()
            model, mmproj = convert.ensure_gguf(checkpoint, "f32")
            kv_type, flash_attn = peer.peer_kv("f32")  # the float32 engine's KV cells: the same caches
            llama = peer.LlamaServer(binary, model, mmproj, build / "llama-server.log", threads=decode,
                                     threads_batch=prefill, cache_ram_mib=max(1, args.kv_cache_bytes >> 20),
                                     kv_type=kv_type, flash_attn=flash_attn)
            servers.append(llama)
            llama.start()
            print(f"[prefix] {peer.server_version(binary)}; threads {decode}, threads-batch {prefill}, "
                  f"--cache-ram {llama.cache_ram_mib}, KV cells {kv_type}, flash attention {flash_attn}", flush=True)
            sides.append(HttpSide(LLAMACPP, llama.address, llamacpp_body))
        rounds = run_rounds(sides, args.rounds, args.size, args.max_tokens, log=lambda m: print(m, flush=True))
    finally:
        for s in reversed(servers):
            s.stop()
    summary = summarize(rounds)
    load1 = os.getloadavg()
    shares = host.share()
    print()
    print(format_summary(summary))
    print(f"image {args.size}x{args.size}, {args.rounds} rounds, max_tokens {args.max_tokens}, kv_cache_bytes "
          f"{args.kv_cache_bytes}; engine threads: prefill {prefill}, decode {decode} (llama-server the same)")
    print(f"host: load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end; other processes "
          f"{100 * shares['other_processes_cpu_share']:.0f}% of the CPU, steal {100 * shares['steal_cpu_share']:.0f}%")
    print(f"{format_machine(rates)}; read on 1 thread {rates['read_gbps_1_thread']:.1f} GB/s")
    print(f"cpu: {facts['cpu_model']}; {len(os.sched_getaffinity(0))} cores; features {' '.join(facts['cpu_flags'])}")
    for warning in HostLoad.warnings(shares):
        print(f"warning: {warning}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "summary": summary, "rounds": [asdict(r) for r in rounds], "machine": rates, "cpu": facts,
            "load_average": {"start": load0, "end": load1}, "host": shares,
            "config": {"size": args.size, "rounds": args.rounds, "max_tokens": args.max_tokens,
                       "kv_cache_bytes": args.kv_cache_bytes, "threads": {"prefill": prefill, "decode": decode}},
        }, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


# -- in process -----------------------------------------------------------------------------------------
def first_token(engine, req, timeout: float = 600.0) -> tuple[float, list[int]]:
    """Seconds from submit to the first token, and every generated id."""
    got, done, t0 = [], threading.Event(), time.perf_counter()
    first: list[float] = []

    def on_tokens(tokens, finish, error):
        if tokens and not first:
            first.append(time.perf_counter())
        got.extend(tokens)
        if finish is not None:
            done.set()

    req.on_tokens = on_tokens
    engine.submit(req)
    if not done.wait(timeout):
        raise TimeoutError("generation did not finish")
    return first[0] - t0, got


STAGES = ("messages parse (JSON, data URL)", "preprocessing (image decode, resize, template, tokens)",
          "vision encoder (content hash, cache hit, table, M-RoPE)", "engine: submit to first token (all)",
          "engine: admission (cos/sin unpack, keys, admit)", "engine: prefix keys (positions, row digests)",
          "  of which row digests", "engine: prefix admit (block keys, restore)", "  of which restore",
          "engine: first step (prefill of the rest, sample)")
S_PARSE, S_PRE, S_ENC, S_ALL, S_ADMIT, S_KEYS, S_DIGESTS, S_PADMIT, S_RESTORE, S_STEP = STAGES


class Stages:
    """Wall time of named stages of one request (engine-thread stages wrapped around the engine's
    own methods: the prefix cache's `keys` and `admit`, the store's `restore`, the runner's step)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.armed = False

    def add(self, name: str, seconds: float) -> None:
        if self.armed:
            self.t[name] = self.t.get(name, 0.0) + seconds

    def wrap(self, obj, attr: str, name: str, once: bool = False) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if not (once and name in self.t):
                    self.add(name, time.perf_counter() - t0)

        setattr(obj, attr, timed)


def engine_main(args) -> int:
    import torch

    from load_tests.bench_report import cpu_features
    from load_tests.workload import make_image
    from qwen3vl_triton.clients.qwen3vl import Qwen3VLRequest
    from qwen3vl_triton.engine import Engine, Request
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.serve.cpu_engine import engine_threads
    from qwen3vl_triton.serve.repository import Settings
    from qwen3vl_triton.text.preprocess import Preprocessor, parse_request

    spec = ModelSpec.load(args.checkpoint)
    served = Settings()  # the served defaults of preprocessing's and the encoder's image caches
    pre = Preprocessor(spec, max_images=4, max_input_len=4095, pixel_cache_bytes=served.pixel_cache_bytes)
    encoder = VisionEncoder(spec, cache_bytes=served.vision_cache_bytes)
    prefill, decode = engine_threads(args.runner, torch.get_num_threads(), 0, 0)
    names = ("on",) if args.breakdown else ("on", "off")
    engines = {name: Engine(spec, max_batch=4, max_seq_len=4096, max_output_len=256, runner=args.runner,
                            threads=prefill, shared_threads=decode, kv_cache_bytes=kv)
               for name, kv in (("on", args.kv_cache_bytes), ("off", 0)) if name in names}
    if engines["on"].prefix is None:
        print(f"prefix cache off: {engines['on'].prefix_note}")
        return 1
    stages = Stages()
    on = engines["on"]
    stages.wrap(on.prefix, "keys", S_KEYS)
    stages.wrap(on.prefix, "_row_digests", S_DIGESTS)
    stages.wrap(on.prefix, "admit", S_PADMIT)
    stages.wrap(on.prefix.store, "restore", S_RESTORE)
    stages.wrap(on.scheduler, "_admit", S_ADMIT)
    stages.wrap(on.runner, "run", S_STEP, once=True)

    def request(messages, timed: bool):
        t0 = time.perf_counter()
        x = parse_request(Qwen3VLRequest(messages=messages, max_tokens=args.max_tokens).arrays(), 1024)
        t1 = time.perf_counter()
        p = pre.request(x)
        t2 = time.perf_counter()
        r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        t3 = time.perf_counter()
        if timed:
            stages.add(S_PARSE, t1 - t0)
            stages.add(S_PRE, t2 - t1)
            stages.add(S_ENC, t3 - t2)
        return Request(p.input_ids, args.max_tokens, end_id=spec.end_id, stop_ids=spec.end_ids,
                       table=r.prompt_embedding_table, mrope_cos_sin=r.mrope_rotary_cos_sin,
                       mrope_delta=r.mrope_position_deltas, extra_ids=r.prompt_table_extra_ids)

    rows = {name: [] for name in engines}
    breakdown: list[dict] = []
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        image = make_image(args.size, args.size, 2000 + r)
        for name, engine in engines.items():
            t1, ids = first_token(engine, request(turn1_messages(image), False))
            text = pre.tokenizer.decode([i for i in ids if i not in spec.end_ids], skip_special_tokens=True)
            stages.t, stages.armed = {}, name == "on" and r > 0
            t_pre = time.perf_counter()
            turn2 = request(turn2_messages(image, text), True)
            before = time.perf_counter() - t_pre
            hits = engine.prefix.stats.hit_tokens if engine.prefix else 0
            t2, _ = first_token(engine, turn2)
            stages.armed = False
            reused = (engine.prefix.stats.hit_tokens - hits) if engine.prefix else 0
            if r:
                rows[name].append((t1, t2, int(turn2.input_ids.size), reused))
                print(f"round {r} cache {name:3}: turn 1 {t1 * 1e3:7.1f} ms, turn 2 {t2 * 1e3:7.1f} ms "
                      f"({turn2.input_ids.size} prompt tokens, {reused} reused), ratio {t2 / t1:.2f}"
                      + (f"; before the engine {before * 1e3:.1f} ms" if name == "on" else ""))
                if name == "on":
                    stages.t[S_ALL] = t2
                    breakdown.append(dict(stages.t))
    print()
    for name, got in rows.items():
        t1 = statistics.median(x[0] for x in got)
        t2 = statistics.median(x[1] for x in got)
        print(f"cache {name:3} ({args.runner}): turn 1 TTFT p50 {t1 * 1e3:.1f} ms, turn 2 p50 {t2 * 1e3:.1f} ms, "
              f"turn 2 / turn 1 = {t2 / t1:.2f}")
    if breakdown:
        print("\nturn 2 with the cache on, stage medians (ms):")
        for key in STAGES:
            print(f"  {key:60s} {statistics.median(b.get(key, 0.0) for b in breakdown) * 1e3:8.2f}")
    stats = on.prefix.stats
    print(f"prefix cache: hit tokens {stats.hit_tokens}, miss tokens {stats.miss_tokens}, entries {stats.entries}, "
          f"bytes {stats.bytes}, evictions {stats.evictions}")
    facts = cpu_features()
    print(f"cpu: {facts['cpu_model']}; {len(os.sched_getaffinity(0))} cores; features {' '.join(facts['cpu_flags'])}; "
          f"bf16 matrix: {facts['bf16_matrix_instructions'] or 'none'}; load average {os.getloadavg()[0]:.2f}")
    for engine in engines.values():
        engine.shutdown()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.prefix_ttft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--served", action="store_true", help="the served stack over its OpenAI endpoint")
    ap.add_argument("--llamacpp", action="store_true", help="llama-server with cache_prompt, in turn with --served")
    ap.add_argument("--openai-url", help="--served: HOST:PORT of a running OpenAI endpoint (default: start one)")
    ap.add_argument("--metrics-url", help="--served with --openai-url: HOST:PORT of its tritonserver's metrics")
    ap.add_argument("--json", help="--served/--llamacpp: write the rounds and the summary here")
    ap.add_argument("--breakdown", action="store_true", help="in process: time each stage of turn 2")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small"))
    ap.add_argument("--runner", default="ggml", choices=("ggml", "torch"), help="in process: the engine's runner")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20)
    args = ap.parse_args(argv)
    if args.openai_url and not args.metrics_url:
        ap.error("--openai-url needs --metrics-url (the served engine's reuse counters)")
    if args.served or args.llamacpp:
        return http_main(args)
    return engine_main(args)


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
