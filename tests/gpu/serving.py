"""Disaggregated serving through CUDA shared memory on a GPU host (part 3 of tests/gpu/device_check.sh).

An encoder server (`encode`) and a language server (`language` -> `tensorrt_llm`, the CPU engine)
run as two real tritonserver processes on the tiny checkpoint. For each request the client
(qwen3vl_triton.transfer.sender.Disaggregated, transport `cuda_shm`) registers one CUDA shared-memory
region with both servers; the encoder server writes the prompt table into it and the language
server reads its chunks from it. Checked against the CPU path:

- the bytes in the region equal the table the same encoder returns over gRPC (transport `grpc`);
- the generated token ids equal transformers' greedy `generate` (tests/oracle.py) and the text
  equals their decode; the `grpc` transport is run too and must give the same text.

`--transport shm` runs the same with system shared memory: the dry run on a host without a GPU.

Runs in the Python the servers' stubs use (numpy < 2: the Triton 2.51 stub needs it), with
TRITONSERVER pointing at the server binary:

    python -m tests.gpu.serving --work DIR --report serving.json
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

CASES = [
    ("one image", "Describe this image in short.", [(100, 150, 1, "PNG")], 24),
    ("two images", "Compare the two images.", [(200, 64, 2, "PNG"), (64, 96, 3, "JPEG")], 30),
    ("text only", "Tell me about the ocean.", [], 40),
]
# the language server's row cache off: each case's table crosses the transport under test whole,
# though the gRPC reference run sent the same image first
SETTINGS = dict(max_output_len=256, max_seq_len=2048, max_images=4, max_image_pixels=1_000_000, engine_max_batch=8,
                max_batch_size=16, language_row_cache_bytes=0)


def start_servers(checkpoint: Path, work: Path, log) -> dict:
    """The encoder and the language server, one after the other (each from this thread: a server
    stops when the thread that started it ends); {topology: TritonServer}."""
    from qwen3vl_triton.serve.repository import Settings, render
    from qwen3vl_triton.serve.server import Ports, TritonServer, free_ports

    servers = {}
    try:
        for topology in ("encoder", "language"):
            base = work / topology
            repo = render(checkpoint, base / "repository", topology=topology, settings=Settings(**SETTINGS))
            http, grpc, metrics = free_ports(3)
            srv = TritonServer(repo, Ports(http, grpc, metrics), build_dir=base, log_file=base / "tritonserver.log",
                               extra_args=["--exit-timeout-secs=5", "--allow-gpu-metrics=false"])
            t0 = time.monotonic()
            srv.start(timeout=float(os.environ.get("SERVER_START_TIMEOUT", "150")), log=log)
            servers[topology] = srv
            log(f"{topology} server ready in {time.monotonic() - t0:.1f}s on {srv.grpc_url}")
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def region_contents(d, enc):
    """The table as it lies in the transport's shared region (read back by this process)."""
    return d.transport.read_rows(enc)


def run_case(part, oracle, enc_url: str, lang_url: str, name: str, prompt: str, images: list[bytes], n: int,
             transport: str = "cuda_shm") -> None:
    import numpy as np

    from qwen3vl_triton.transfer.sender import Disaggregated

    want_ids = oracle.generate(prompt, images, n)
    want_text = oracle.text(want_ids)
    with Disaggregated(enc_url, lang_url, transport="grpc", chunk_rows=16) as g:
        ref = g.encode(prompt, images, n)
        grpc_text = "".join(g.run(ref, n))
    with Disaggregated(enc_url, lang_url, transport=transport, chunk_rows=16) as d:
        t0 = time.perf_counter()
        enc = d.encode(prompt, images, n)
        encode_s = time.perf_counter() - t0
        region = region_contents(d, enc)
        same_bytes = (enc.rows, enc.hidden) == ref.table.shape and region.tobytes() == ref.table.tobytes()
        part.check(
            f"{name}: the region holds the encoder's table byte for byte",
            same_bytes,
            f"{enc.rows} rows x {enc.hidden} {enc.dtype} ({enc.table_bytes} bytes)"
            + (
                ""
                if same_bytes
                else f", max |diff| {np.abs(region - ref.table).max() if region.shape == ref.table.shape else 'shape'}"
            ),
        )
        part.check(f"{name}: same prompt ids through both transports",
                   np.array_equal(enc.input_ids, ref.input_ids))
        corrid = secrets.randbits(62) or 1
        try:
            d.transfer(corrid, enc, n)
            pieces, ids = [], []
            for text, new in d.stream(corrid):
                pieces.append(text)
                ids += new
        finally:
            d.lang.end(corrid)
        stats = d.stats
    text = "".join(pieces)
    part.check(f"{name}: {transport} tokens equal transformers' greedy ids", ids == want_ids,
               f"{len(ids)} tokens" + ("" if ids == want_ids else f"; got {ids[:12]}..., want {want_ids[:12]}..."))
    part.check(f"{name}: {transport} text equals their decode and the grpc transport's",
               text == want_text == grpc_text, "" if text == want_text == grpc_text else
               f"{transport} {text[:60]!r}, oracle {want_text[:60]!r}, grpc {grpc_text[:60]!r}")
    part.figures.setdefault("cases", []).append({
        "case": name, "rows": enc.rows, "hidden": enc.hidden, "table_bytes": enc.table_bytes, "chunks": stats.chunks,
        "payload_bytes": stats.payload_bytes, "resumes": stats.resumes, "transfer_s": round(stats.seconds, 4),
        "encode_s": round(encode_s, 4), "tokens": len(ids)})


def run(work: Path, report: str | None, checkpoint: str | None = None, transport: str = "cuda_shm",
        cases: list[str] | None = None) -> int:
    from tests.gpu.report import Part

    with Part("serving", report) as part:
        import numpy as np

        f = part.figures
        f["numpy"] = np.__version__
        if not part.check("numpy < 2 in the stubs' environment", np.__version__ < "2", np.__version__):
            return part.finish()
        f["transport"] = transport
        try:
            region_module = {"cuda_shm": "cuda_shared_memory", "shm": "shared_memory"}[transport]
            __import__(f"tritonclient.utils.{region_module}")
        except Exception as exc:  # noqa: BLE001
            part.fail(f"tritonclient.utils.{region_module} does not import: {type(exc).__name__}: {exc}")
            return part.finish()
        import torch
        import transformers

        from qwen3vl_triton.model.tiny import build_checkpoint
        from qwen3vl_triton.serve.server import find_tritonserver
        from tests.oracle import Oracle, image_bytes

        f.update(torch=torch.__version__, transformers=transformers.__version__, tritonserver=str(find_tritonserver()))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        ckpt = Path(checkpoint) if checkpoint else build_checkpoint(work / "tiny", profile="tiny", seed=0,
                                                                    log=lambda *_: None)
        part.log(f"tiny checkpoint at {ckpt} ({time.monotonic() - t0:.1f}s)")
        t0 = time.monotonic()
        servers = start_servers(ckpt, work, part.log)
        f["servers_start_s"] = round(time.monotonic() - t0, 1)
        part.log(f"encoder and language servers ready in {f['servers_start_s']}s")
        try:
            oracle = Oracle(ckpt)
            enc_url, lang_url = servers["encoder"].grpc_url, servers["language"].grpc_url
            for name, prompt, specs, n in CASES:
                if cases and name not in cases:
                    continue
                images = [image_bytes(w, h, seed, fmt=fmt) for w, h, seed, fmt in specs]
                try:
                    run_case(part, oracle, enc_url, lang_url, name, prompt, images, n, transport)
                except Exception as exc:  # noqa: BLE001 -- one case's failure is reported; the others run
                    part.check(f"{name}: ran", False, f"{type(exc).__name__}: {exc}")
            for topology, srv in servers.items():
                alive = srv.process is not None and srv.process.poll() is None
                part.check(f"the {topology} server is still serving", alive)
        finally:
            for srv in servers.values():
                srv.stop()
    return part.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a scratch folder: checkpoint, repositories, server logs")
    ap.add_argument("--report")
    ap.add_argument("--checkpoint", help="an existing checkpoint instead of building the tiny one")
    ap.add_argument("--transport", choices=["cuda_shm", "shm"], default=os.environ.get("DEVICE_CHECK_TRANSPORT",
                                                                                       "cuda_shm"))
    ap.add_argument("--case", action="append", help="run only this case (repeatable)")
    args = ap.parse_args(argv)
    return run(Path(args.work), args.report, args.checkpoint, args.transport, args.case)


if __name__ == "__main__":
    raise SystemExit(main())
