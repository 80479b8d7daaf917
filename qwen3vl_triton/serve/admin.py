"""The admin key: Triton's management APIs are closed to clients that do not send it.

Every server the project starts restricts shared-memory registration and status, logging, trace and
model-repository (load, unload, index) to requests with the header `admin-key: <key>` (HTTP) or
`triton-grpc-protocol-admin-key: <key>` (gRPC, Triton's prefix for restricted protocols). Inference,
health, metadata, statistics and model-config stay open: perf_analyzer, genai-perf, Model Analyzer and
tritonclient's examples read a model's configuration before they send anything, and the rendered
configurations hold no host path (repository.py) and no secret.

The key comes from `--admin-key`, else QWEN3VL_ADMIN_KEY, else it is generated: once per process,
so servers and clients started by one process (tests, benchmarks, the demo) share it; the launcher
writes a generated key to a file only its user can read, one per server (`key_file`). A client in
another process sends QWEN3VL_ADMIN_KEY (or the key it is given); Triton answers a missing key and a
wrong one alike ("expecting header ..."), so `refused` tells the two apart by what was sent.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

ENV = "QWEN3VL_ADMIN_KEY"
HEADER = "admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"
RESTRICTED = ("shared-memory", "logging", "trace", "model-repository")
_VALID = re.compile(r"^[A-Za-z0-9_-]{16,256}$")  # no ',', ':' or '=': they delimit Triton's flag
_generated: str | None = None


def check(key: str) -> str:
    if not _VALID.match(key):
        raise ValueError("an admin key is 16 to 256 characters from A-Z, a-z, 0-9, '_' and '-'")
    return key


def default_key() -> str:
    """QWEN3VL_ADMIN_KEY, else a random key generated once for this process."""
    global _generated
    if os.environ.get(ENV):
        return check(os.environ[ENV])
    if _generated is None:
        _generated = secrets.token_urlsafe(32)
    return _generated


def key_file(build: str | Path, topology: str, grpc_port: int) -> Path:
    """Where qwen3vl-serve writes a key it generated: one file per server (topology and gRPC port)."""
    return Path(build) / f"admin-key-{topology}-{grpc_port}"


def key_source(given: str | None) -> str:
    """Where the key a client sends comes from, in words (for an error message)."""
    if given:
        return "the admin key passed to it"
    if os.environ.get(ENV):
        return f"the admin key in ${ENV}"
    return f"no admin key (${ENV} is not set; a random key of this process was sent)"


def refused(server: str, given: str | None) -> str:
    """What to say when `server` refused a management call made with the key from `given` (or the
    default_key): a wrong key and a missing one are answered alike by Triton."""
    return (f"{server} refused {key_source(given)}: it is not that server's key. Set ${ENV} to the key the "
            f"server was started with (qwen3vl-serve --admin-key or ${ENV}; else the file its ready line "
            f"names, <build-dir>/admin-key-<topology>-<grpc-port>), or pass admin_key=")


def server_args(key: str) -> list[str]:
    """tritonserver flags that restrict the management APIs to requests carrying `key`."""
    apis = ",".join(RESTRICTED)
    return [f"--http-restricted-api={apis}:{HEADER}={check(key)}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]


def grpc_headers(key: str) -> dict[str, str]:
    return {GRPC_HEADER: key}


def http_headers(key: str) -> dict[str, str]:
    return {HEADER: key}
