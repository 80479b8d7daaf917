"""How a model's stub ends when its server stops: generations end at once, the stub exits at once.

What Triton 2.51 does on SIGINT/SIGTERM (core server.cc `Stop`, python_backend r24.10): it waits,
up to --exit-timeout-secs, until no model counts an in-flight inference -- an ensemble counts each
request until its last step has sent its final response -- then unloads every model. Unloading a
Python model stops the stub's response threads first, then asks the stub to finalize, then waits
for the stub process to exit. Two things made a stop take the whole exit timeout:

- A generation runs on after its decoupled model's `execute` has returned, so Triton does not see
  it, and nothing tells the model that the server is stopping: the `qwen3vl` ensemble's request
  stays in flight until its generation ends on its own, and a response sent from `finalize` is
  never delivered (the threads that deliver them are gone by then), so a generation cut by the
  unload left its ensemble request open for good. `ServerStopWatch` sees the stop while the
  models are still loaded: it asks the server whether it is live (Triton answers "Server exiting"
  once a stop has begun) every cancellation period while the model has work, and the model then
  ends that work with an error its clients receive.
- After `finalize`, the stub ran CPython's own shutdown: it joins every non-daemon thread (a worker
  still waiting on a generation held the stub, and the server with it), then collects the
  garbage of an interpreter holding torch and transformers: seconds of CPU per stub, every stub
  at once. `exit_stub` ends the process from `finalize` instead: the stub has already answered
  the finalize request, and the server only waits for the process to end.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

STOPPING = "the server is stopping"


def exit_stub(code: int = 0) -> None:
    """End this stub process now (call it last in `finalize`): see the module docstring."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- a closed stream must not keep the stub alive
            pass
    os._exit(code)


def server_stopping(error: Exception) -> bool:
    """Whether a failed liveness call says the server is stopping: Triton answers "Server exiting"
    once a stop has begun, and refuses connections once its endpoints are closed. A slow answer
    (a deadline) says nothing."""
    text = str(error).lower()
    return "exiting" in text or "connection refused" in text or "failed to connect" in text


class Work:
    """How many requests a model is working on (`start` and `finish` each): ServerStopWatch's `busy`."""

    def __init__(self):
        self._count, self._lock = 0, threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._count += 1

    def finish(self) -> None:
        with self._lock:
            self._count -= 1

    def __bool__(self) -> bool:
        return self._count > 0


class ServerStopWatch:
    """Calls `on_stop()` once, within about `period` seconds of the server beginning to stop,
    provided the model has work then (`busy()`): only then does it ask the server, over its own
    gRPC endpoint (`url`), whether it is live -- one loopback call per period, none while idle."""

    def __init__(self, url: str, period: float, busy: Callable[[], bool], on_stop: Callable[[], None],
                 timeout: float = 2.0):
        self.url, self.period, self.busy, self.on_stop, self.timeout = url, period, busy, on_stop, timeout
        self.stopping = threading.Event()
        self._closed = threading.Event()
        self._client = None
        self._thread = threading.Thread(target=self._run, name="server-stop-watch", daemon=True)
        self._thread.start()

    def _live(self) -> bool:
        import tritonclient.grpc as grpcclient

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        try:
            return self._client.is_server_live(client_timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 -- tritonclient raises its own and gRPC's errors
            return not server_stopping(exc)

    def _connect(self) -> bool:
        """Open the channel once the server listens and answers, before any work: the stub's
        threads and descriptors are then fixed from the start (a channel opened at the first busy
        period showed up as a leak of 6 threads and 5 descriptors). No channel is made before the
        port accepts connections: one made earlier backs off between attempts, and a call during
        the backoff fails at once with the old "connection refused" (read as a stopping server)."""
        import tritonclient.grpc as grpcclient

        from qwen3vl_triton.clients.llm import listening

        if self._client is None:
            if not listening(self.url, self.timeout):
                return False
            self._client = grpcclient.InferenceServerClient(self.url)
        try:
            return bool(self._client.is_server_live(client_timeout=self.timeout))
        except Exception:  # noqa: BLE001 -- not up yet: try again next period
            return False

    def _run(self) -> None:
        connected = False
        while not self._closed.wait(self.period):
            if not connected:  # liveness is judged only over a channel that has reached the server
                connected = self._connect()
                continue
            if self.busy() and not self._live():
                self.stopping.set()
                self.on_stop()
                return

    def close(self) -> None:
        self._closed.set()
