"""How `postprocessing` and `language` run a generation on `tensorrt_llm`: a gRPC stream to the
server that runs them (its own endpoint, on loopback), one per generation.

Not BLS. On Triton 2.51 (python_backend r24.10, unchanged at its head) decoupled BLS requests
made from several threads of one stub deadlock the stub: a thread starting `exec(decoupled=True)`
holds the GIL while it waits for the stub's response-iterator map lock; the stub thread that
delivers BLS responses holds that lock while it waits for one iterator's lock; and the thread
reading that iterator holds the iterator's lock while it waits for the GIL. Under load here the
whole `language` stub stopped (every thread's stack showed that cycle in gdb). Both models run
each generation on a thread of their own, so they leave BLS for a gRPC stream: its responses are
routed to the request's own queue, with no lock held across a wait for the GIL. (Decoupled BLS
also lost an error response that followed other responses; a gRPC stream delivers it.)
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen3vl_triton.clients.grpc_stream import GrpcStream

MODEL = "tensorrt_llm"
# the longest wait for the next response of a generation (a request queued behind a full batch
# waits for a place): past it the generation fails instead of waiting forever
RESPONSE_TIMEOUT_S = 600.0


def server_grpc_url(pid: int | None = None) -> str:
    """HOST:PORT of the gRPC endpoint of the tritonserver process `pid` (default: this process's
    parent, the server that started this stub), read from its command line; Triton's defaults
    (0.0.0.0:8001) where a flag is absent. Reached on loopback when it listens on every address."""
    pid = os.getppid() if pid is None else pid
    argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
            flags[key] = value
    if flags.get("allow-grpc", "true").lower() in ("false", "0", "off", "no"):
        raise RuntimeError("the server runs with --allow-grpc=false; postprocessing and language reach "
                           "tensorrt_llm over the server's own gRPC endpoint, so it must be on")
    host = flags.get("grpc-address") or "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return f"{host}:{flags.get('grpc-port', '8001')}"
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"{ip}:{flags.get('grpc-port', '8001')}" if ip.version == 4 else f"[{ip}]:{flags.get('grpc-port', '8001')}"


def _inputs(tensors: dict[str, np.ndarray]):
    from qwen3vl_triton.clients.grpc_stream import infer_input

    return [infer_input(name, value) for name, value in tensors.items()]


def generate(url: str, tensors: dict[str, np.ndarray], request_id: str,
             timeout: float = RESPONSE_TIMEOUT_S) -> Iterator[np.ndarray]:
    """Run one streamed `tensorrt_llm` request; yield each response's `output_ids` (1-D int32,
    empty for a response without tokens) until its final response. An error response raises
    grpc_stream.StreamError."""
    import tritonclient.grpc as grpcclient

    stream, finished = GrpcStream(url, timeout), False
    try:
        for result in stream.request(MODEL, _inputs(tensors), request_id=request_id,
                                     outputs=[grpcclient.InferRequestedOutput("output_ids")]):
            ids = result.as_numpy("output_ids")
            yield np.zeros(0, np.int32) if ids is None else ids.reshape(-1)
        finished = True
    finally:  # a caller that leaves before the final response cancels the request
        stream.close(cancel=not finished)


def _stop_inputs() -> dict[str, np.ndarray]:
    one = np.ones((1, 1), np.int32)
    return {"input_ids": one, "input_lengths": one, "request_output_len": one, "stop": np.ones((1, 1), np.bool_)}


def stop(url: str, request_id: str, timeout: float = 30.0) -> None:
    """End the running `tensorrt_llm` request `request_id` (the tensorrtllm backend's `stop`
    input): it finishes as an ordinary request does, with the tokens it has."""
    stream = GrpcStream(url, timeout)
    try:
        for _ in stream.request(MODEL, _inputs(_stop_inputs()), request_id=request_id):
            pass
    finally:
        stream.close(cancel=False)


def stop_http(url: str, request_id: str, timeout: float = 30.0) -> None:
    """`stop` through the server's HTTP endpoint `url` (HOST:PORT): Triton's generate_stream, as
    `tensorrt_llm` is decoupled."""
    import requests

    body = {"id": request_id, **{name: value.reshape(-1).tolist() for name, value in _stop_inputs().items()}}
    resp = requests.post(f"http://{url}/v2/models/{MODEL}/generate_stream", json=body, timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"stop of {request_id} failed: HTTP {resp.status_code} {resp.text[:200]}")


def generation_id(result) -> str | None:
    """The `generation_id` of a `qwen3vl` response (a tritonclient result), None where the model
    sends none (qwen3vl_disagg)."""
    gid = result.as_numpy("generation_id")
    return None if gid is None else gid.reshape(-1)[0].decode()


def stop_left(url: str, generation: str, protocol: str = "grpc") -> str | None:
    """End the generation of a `qwen3vl` stream its caller left (Triton 2.51 does not cancel an
    ensemble step already running): `stop` by its `generation_id`, over `protocol` to the server
    at `url`. Returns why it failed, or None (a generation that ended meanwhile is no error)."""
    try:
        (stop if protocol == "grpc" else stop_http)(url, generation)
    except Exception as exc:  # noqa: BLE001 -- reported to the caller, who only logs it
        return f"could not stop generation {generation}: {exc}"
    return None
