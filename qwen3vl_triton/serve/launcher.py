"""qwen3vl-serve: render the model repository for a checkpoint and run tritonserver in the foreground.

Checks the checkpoint first (`check.check_checkpoint`: config, tokenizer, processor, every
tensor's shape from the safetensors headers) and prints its facts; `--check` stops there, with
exit status 0 when the checkpoint and the settings can be served, 1 otherwise. Prints one line
starting with `ready:` once every model is ready; SIGINT or SIGTERM stops the server and every
stub process it started. Serving settings come from `--settings-file` (KEY=VALUE lines) and
`--set KEY=VALUE`, which wins over the file. Triton's management APIs (shared memory, logging,
trace, model repository) answer only requests with the admin key: `--admin-key`,
else QWEN3VL_ADMIN_KEY, else a random key written to <build-dir>/admin-key-<topology>-<grpc-port>
(mode 0600; one file per server, so servers started from one checkout keep their own key).

Topologies (which models one server holds):
  all       every model: the qwen3vl ensemble and both disaggregated entry points (encode, language)
  single    the qwen3vl ensemble alone (preprocessing, vision_encoder, tensorrt_llm, postprocessing)
  encoder   the disaggregated encoder server: encode (preprocessing -> vision_encoder), and
            qwen3vl_disagg when --set language_urls=HOST:PORT[,HOST:PORT...] (or dns:NAME:PORT) names language servers
  language  the disaggregated language server: language -> tensorrt_llm (+ postprocessing)
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from qwen3vl_triton.model.check import check_checkpoint
from qwen3vl_triton.model.checkpoint import CheckpointError
from qwen3vl_triton.model.tiny import ensure_checkpoint
from qwen3vl_triton.serve import admin, cpu_engine
from qwen3vl_triton.serve.repository import TOPOLOGIES, RenderError, Settings, render
from qwen3vl_triton.serve.server import OpenAIServer, Ports, ServerError, TritonServer

DEFAULT_PLUGIN = "/opt/qwen3vl/lib/libqwen3vl_deepstack_plugin.so"


def settings_from(pairs: list[str]) -> Settings:
    settings = Settings()
    known = {f.name: f.type for f in fields(Settings)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        current = getattr(settings, key)
        setattr(settings, key, type(current)(value))
    return settings


def settings_file_pairs(path: str | Path) -> list[str]:
    """The KEY=VALUE lines of a settings file as `--set` pairs, in order.

    One setting a line, `#` starts a comment line, blank lines are skipped; the value is the rest of
    the line after the first `=`, stripped (no inline comments, no quotes). A key that is not a
    serving setting, or a value of the wrong type, is an error naming the file, the line and the key."""
    known = {f.name for f in fields(Settings)}
    defaults = Settings()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"--settings-file {path}: cannot read it: {exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise SystemExit(f"--settings-file {path}, line {number}: expected KEY=VALUE, got {line!r}")
        if key not in known:
            raise SystemExit(f"--settings-file {path}, line {number}: unknown setting {key!r} "
                             f"(known: {', '.join(sorted(known))})")
        try:
            type(getattr(defaults, key))(value)
        except ValueError:
            raise SystemExit(f"--settings-file {path}, line {number}: {key}={value!r} is not a valid "
                             f"{type(getattr(defaults, key)).__name__}") from None
        pairs.append(f"{key}={value}")
    return pairs


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings file's values (--settings-file), then each --set over them."""
    return settings_from((settings_file_pairs(args.settings_file) if args.settings_file else []) + args.set)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="qwen3vl-serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--checkpoint", help="Hugging Face Qwen3-VL-MoE checkpoint directory "
                                         "(default: build the tiny test checkpoint into checkpoints/tiny)")
    ap.add_argument("--topology", choices=sorted(TOPOLOGIES), default="all",
                    help="which models this server holds (default all; each is described below)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 inside a container)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--build-dir", default="build", help="where the rendered repository and logs go")
    ap.add_argument("--log-file", help="tritonserver log (default: <build-dir>/tritonserver-<topology>.log)")
    ap.add_argument("--engine-dir", help="the TensorRT-LLM engine built for the checkpoint (device gpu)")
    ap.add_argument("--plugin", default=os.environ.get("QWEN3VL_DEEPSTACK_PLUGIN", DEFAULT_PLUGIN),
                    help="DeepStack plugin library preloaded for the tensorrtllm backend (GPU only)")
    ap.add_argument("--settings-file", metavar="PATH",
                    help="serving settings, one KEY=VALUE a line (# comments); --set overrides them")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a serving setting (repeatable): " + ", ".join(f.name for f in fields(Settings)))
    ap.add_argument("--check", action="store_true",
                    help="check the checkpoint and the settings, print the checkpoint's facts, and exit "
                         "(0: it can be served; 1: it cannot, with the reasons)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for every model to be ready")
    ap.add_argument("--openai-port", type=int, default=0,
                    help="also serve the OpenAI-compatible API (/v1/chat/completions, /v1/models) on this port, "
                         "same address (topologies with qwen3vl: all, single; or encoder with language_urls, "
                         "through qwen3vl_disagg)")
    ap.add_argument("--admin-key", default=os.environ.get(admin.ENV),
                    help="the key Triton's management APIs require (header admin-key; gRPC: "
                         f"{admin.GRPC_HEADER}); default ${admin.ENV}, else a random one written to "
                         "<build-dir>/admin-key-<topology>-<grpc-port>")
    ap.add_argument("--exit-timeout", type=int, default=30,
                    help="seconds a stop waits for in-flight requests (tritonserver --exit-timeout-secs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    build = Path(args.build_dir).resolve()
    settings = settings_of(args)
    chat_model = openai_model(args.topology, settings)
    if args.openai_port and chat_model is None:
        print(f"error: --openai-port needs the qwen3vl model, or qwen3vl_disagg (topology encoder with "
              f"language_urls); topology {args.topology} has neither", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(Path("checkpoints/tiny"))
    report = check_checkpoint(checkpoint, settings.engine_max_batch, settings.max_seq_len)
    if args.check:
        if report.spec is not None:
            try:
                settings.check(report.spec, args.device)
                report.facts.append(("serving engine", cpu_engine.choose(report.spec, settings, args.device).describe()
                                     + f" (cpu_runner={settings.cpu_runner}, dtype={settings.dtype})"))
            except RenderError as exc:
                report.problems.append(str(exc))
        print(report.text(), flush=True)
        return 0 if report.ok else 1
    if not report.ok:
        print(f"error: checkpoint {checkpoint} cannot be served: " + "; ".join(report.problems), file=sys.stderr)
        return 2
    print(report.text(), flush=True)
    try:
        settings.check(report.spec, args.device)
        # the LLM's engine and, for the ggml runner, its weights converted now (once), before the server
        engine = cpu_engine.prepare(report.spec, settings, args.device, build, log=lambda m: print(m, flush=True))
        repo = render(checkpoint, build / "repository" / args.topology, device=args.device, topology=args.topology,
                      settings=settings, engine_dir=args.engine_dir, extra=cpu_engine.values_of(engine))
    except (RenderError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preload = []
    if args.device == "gpu":
        if not Path(args.plugin).is_file():
            raise SystemExit(f"DeepStack plugin {args.plugin} not found: build it (builders/plugin) or pass --plugin")
        preload.append(args.plugin)
    log_file = Path(args.log_file) if args.log_file else build / f"tritonserver-{args.topology}.log"
    try:
        key, key_note = admin_key(args.admin_key, build, args.topology, args.grpc_port)
    except ValueError as exc:
        print(f"error: --admin-key: {exc}", file=sys.stderr)
        return 2
    server = TritonServer(repo, Ports(args.http_port, args.grpc_port, args.metrics_port), build_dir=build,
                          address=args.address, log_file=log_file, preload=preload,
                          extra_args=[f"--exit-timeout-secs={args.exit_timeout}"], admin_key=key)
    # What the checks above imported (torch, transformers) lives as long as this process: frozen out
    # of the collector, it costs no final garbage collection (seconds of CPU) when the process ends.
    gc.freeze()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting tritonserver: repository {repo}, log {log_file}", flush=True)
    try:
        server.start(timeout=args.timeout)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    openai = None
    try:
        if args.openai_port:
            openai = OpenAIServer(server.grpc_url, args.address, args.openai_port, settings,
                                  log_file=build / f"openai-{args.topology}.log", model=chat_model).start()
    except ServerError as exc:
        server.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    models = ",".join(sorted(p.name for p in repo.iterdir() if p.is_dir()))
    print(f"ready: http={server.http_url} grpc={server.grpc_url} metrics={args.address}:{args.metrics_port} "
          f"models={models} engine={engine.runner} dtype={engine.dtype} admin-key={key_note}"
          + (f" openai=http://{openai.url}/v1" if openai else ""), flush=True)
    try:
        while not stop.wait(0.5):
            for name, proc, log in (("tritonserver", server.process, log_file),
                                    ("the OpenAI server", openai and openai.process, openai and openai.log_file)):
                if proc is not None and proc.poll() is not None:
                    print(f"error: {name} exited with code {proc.returncode}; see {log}", file=sys.stderr)
                    return 1
    finally:
        if "language" in TOPOLOGIES[args.topology] and server.process.poll() is None:
            drain(server, repo, settings.drain_timeout_s)
        # both at once: the generations the OpenAI server relays end as soon as Triton ends them
        for running in (openai, server):
            if running is not None:
                running.begin_stop()
        if openai is not None:
            openai.stop()
        server.stop()
    print("stopped", flush=True)
    return 0


def openai_model(topology: str, settings: Settings) -> str | None:
    """The model the OpenAI endpoint calls on this topology (None: none it can call)."""
    if "qwen3vl" in TOPOLOGIES[topology]:
        return "qwen3vl"
    if "qwen3vl_disagg" in TOPOLOGIES[topology] and settings.language_servers:
        return "qwen3vl_disagg"
    return None


def drain(server: TritonServer, repo: Path, seconds: float, log=print) -> None:
    """A language server's stop: the `language` model takes no new sequence (its readiness in
    op=load says so, and orchestrators choose other servers), and the open ones have up to
    `seconds` to end; the server stops after that (orchestrators move those still running)."""
    from qwen3vl_triton.transfer.receiver import DRAIN_FILE
    from qwen3vl_triton.transfer.sender import LanguageClient

    (repo / "language" / DRAIN_FILE).touch()
    log(f"draining: no new sequence; waiting up to {seconds}s for the open ones", flush=True)
    deadline = time.monotonic() + seconds
    lang = LanguageClient(server.grpc_url, timeout=5)
    sequences = None
    try:
        while time.monotonic() < deadline:
            try:
                sequences, _, draining = lang.load()
            except Exception:  # noqa: BLE001 -- the server is gone: nothing left to wait for
                break
            if draining and sequences == 0:
                break
            time.sleep(0.2)
    finally:
        lang.close()
    log(f"drained: {sequences if sequences is not None else 'unknown'} sequence(s) still open", flush=True)


def admin_key(given: str | None, build: Path, topology: str, grpc_port: int) -> tuple[str, str]:
    """The admin key and how to find it: the one given, or a new random one written to
    <build>/admin-key-<topology>-<grpc_port> (admin.key_file), readable by this user only (never
    printed: logs are read by others). One file per server: an encoder and a language server
    started from one checkout do not overwrite each other's key."""
    if given:
        return admin.check(given), "given"
    key = admin.default_key()
    path = admin.key_file(build, topology, grpc_port)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key + "\n")
    return key, str(path)


if __name__ == "__main__":
    sys.exit(main())
