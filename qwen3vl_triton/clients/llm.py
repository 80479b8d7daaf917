"""How `postprocessing` and `language` run generations on `tensorrt_llm`: one `LLMConnection` per
model instance, a gRPC channel to the server that runs them (its own endpoint, on loopback) with
one bidirectional stream that every generation of the instance shares, and one for `stop`s.

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
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen3vl_triton.clients.grpc_stream import GrpcStream, InFlight
from qwen3vl_triton.contract import MODEL, LLMRequest, LLMResponse, StopRequest
from qwen3vl_triton.errors import StreamError


def listening(url: str, timeout: float = 1.0) -> bool:
    """Whether HOST:PORT accepts a TCP connection. A model's stub asks this before it opens a gRPC
    channel to its own server during load: no channel exists before the server listens (one made
    earlier reconnects with backoff, and gRPC work during a stub's load is best left out)."""
    import socket

    host, _, port = url.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


# the longest wait for the next response of a generation (a request queued behind a full batch
# waits for a place): past it the generation fails instead of waiting forever
RESPONSE_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


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


class LLMConnection:
    """A model instance's connection to `tensorrt_llm`: made once (in `initialize`), used by every
    request from any thread.

    One gRPC channel (`client`: a url, or a tritonclient InferenceServerClient to share, kept open
    on close) carries two streams: the generations' and the stops'. A `stop` carries the request id
    of the generation it ends, so it cannot share that generation's stream, whose responses are
    routed by request id. A stream that broke (the server restarted, the network failed) fails the
    requests waiting on it with a StreamError that says so; the next request opens a new one.

    `at_load`: made in a model's `initialize`, to the server that runs the model: both streams are
    opened by a thread as soon as the server's endpoint listens (once the models have loaded), so
    the stub's thread count does not depend on the traffic it has seen and `initialize` never waits. Otherwise (clients)
    each stream is opened when first used."""

    def __init__(self, client, timeout: float = RESPONSE_TIMEOUT_S, stop_timeout: float = STOP_TIMEOUT_S,
                 model: str = MODEL, at_load: bool = False):
        import tritonclient.grpc as grpcclient

        self.own = isinstance(client, str)
        self.client = grpcclient.InferenceServerClient(client) if self.own else client
        self.timeout, self.stop_timeout, self.model, self.wait_for_ready = timeout, stop_timeout, model, at_load
        self._streams: dict[str, GrpcStream | None] = {"generations": None, "stops": None}
        self._lock = threading.Lock()
        if at_load:  # opened by a thread once the server listens: `initialize` returns at once
            url = client if isinstance(client, str) else None
            self._opener = threading.Thread(target=self._open_when_listening, args=(url,), name="llm-open",
                                            daemon=True)
            self._opener.start()

    def _open_when_listening(self, url: str | None, period: float = 0.1, limit_s: float = 3600.0) -> None:
        import time

        deadline = time.monotonic() + limit_s
        while url is not None and not listening(url) and time.monotonic() < deadline:
            time.sleep(period)
        try:
            for kind in self._streams:
                self._stream(kind)
        except Exception:  # noqa: BLE001 -- the first request opens them instead
            pass

    def _stream(self, kind: str) -> GrpcStream:
        """The open stream of `kind`, a new one when there is none or it broke."""
        with self._lock:
            stream = self._streams[kind]
            if stream is not None and stream.broken:
                stream.close(cancel=False)
                stream = None
            if stream is None:
                stream = GrpcStream(self.client, self.timeout if kind == "generations" else self.stop_timeout,
                                    wait_for_ready=self.wait_for_ready)
                self._streams[kind] = stream
            return stream

    def _submit(self, kind: str, inputs, request_id: str, **kw) -> tuple[GrpcStream, str]:
        """Submit on the stream of `kind`; a stream found broken on the way is replaced once."""
        stream = self._stream(kind)
        try:
            return stream, stream.submit(self.model, inputs, request_id=request_id, **kw)
        except StreamError:
            stream = self._stream(kind)
            return stream, stream.submit(self.model, inputs, request_id=request_id, **kw)

    def generate(self, request: LLMRequest, request_id: str) -> Iterator[np.ndarray]:
        """Run one `tensorrt_llm` request; yield each response's `output_ids` (1-D int32, empty for a
        response without tokens) until its final response. An error response raises StreamError. A
        caller that leaves before the final response stops the request (`stop`)."""
        stream, rid = self._submit("generations", request.infer_inputs(), request_id,
                                   outputs=LLMResponse.requested_outputs())
        finished = False
        try:
            for result in stream.results(rid, self.model):
                yield LLMResponse.from_result(result).output_ids
            finished = True
        except StreamError:
            finished = True
            raise
        finally:
            if not finished:
                stream.forget(rid)
                self.stop(request_id, quiet=True)

    def stop(self, request_id: str, quiet: bool = False) -> None:
        """End the running `tensorrt_llm` request `request_id` (the tensorrtllm backend's `stop`
        input): it finishes as an ordinary request does, with the tokens it has. `quiet`: a
        failure is not raised (the request then ends at its max tokens)."""
        try:
            stream, rid = self._submit("stops", StopRequest(request_id).infer_inputs(), request_id)
            for _ in stream.results(rid, self.model):
                pass
        except InFlight:  # a stop of this request is already on its way
            pass
        except Exception:
            if not quiet:
                raise

    def close(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), dict.fromkeys(self._streams)
        try:
            for stream in streams:
                if stream is not None:
                    stream.close()
        finally:
            if self.own:
                self.client.close()


def stop_http(session, url: str, request_id: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """`stop` through the server's HTTP endpoint `url` (HOST:PORT) on a `requests` session:
    Triton's generate_stream, as `tensorrt_llm` is decoupled."""
    resp = session.post(f"http://{url}/v2/models/{MODEL}/generate_stream", json=StopRequest(request_id).json_body(),
                        timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"stop of {request_id} failed: HTTP {resp.status_code} {resp.text[:200]}")


def generation_id(result) -> str | None:
    """The `generation_id` of a `qwen3vl` response (a tritonclient result), None where the model
    sends none (qwen3vl_disagg)."""
    gid = result.as_numpy("generation_id")
    return None if gid is None else gid.reshape(-1)[0].decode()


def stop_left(stop, generation: str) -> str | None:
    """End the generation of a `qwen3vl` stream its caller left (Triton 2.51 does not cancel an
    ensemble step already running): `stop(generation)` (an LLMConnection's, or `stop_http`).
    Returns why it failed, or None (a generation that ended meanwhile is no error)."""
    try:
        stop(generation)
    except Exception as exc:  # noqa: BLE001 -- reported to the caller, who only logs it
        return f"could not stop generation {generation}: {exc}"
    return None
