"""Start, wait for, and stop a real `tritonserver` for a rendered model repository.

Here the server is the one shipped in the `nvidia-pytriton` wheel (Triton 2.51 with the Python
backend); in the Triton container it is the image's own `/opt/tritonserver`. The Python
backend's stub runs Python in isolated mode, so models get their packages through the
`EXECUTION_ENV_PATH` parameter (the virtual environment) and libpython through
LD_LIBRARY_PATH. Its management APIs are closed to clients without the admin key (admin.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qwen3vl_triton.serve import admin

IMAGE_ROOT = Path("/opt/tritonserver")


class ServerError(RuntimeError):
    pass


def _pytriton_dir() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).parent / "tritonserver"


def find_tritonserver() -> Path:
    """`$TRITONSERVER`, the Triton image's binary, or the one in the nvidia-pytriton wheel."""
    candidates = [os.environ.get("TRITONSERVER"), IMAGE_ROOT / "bin" / "tritonserver"]
    wheel = _pytriton_dir()
    if wheel:
        candidates.append(wheel / "bin" / "tritonserver")
    candidates.append(shutil.which("tritonserver"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise ServerError("no tritonserver found: install nvidia-pytriton (make venv) or set TRITONSERVER")


def backend_directory(build_dir: Path) -> Path:
    """A backends folder whose Python backend has a stub for this interpreter's Python version.

    The image ships a complete one; the wheel keeps one stub per Python version beside the
    backend, so link the right one in.
    """
    server = find_tritonserver()
    image_backends = server.parent.parent / "backends"
    if (image_backends / "python" / "triton_python_backend_stub").is_file():
        return image_backends
    wheel = server.parent.parent
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the Triton Python backend has no stub for Python {version} ({stub})")
    target = build_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in [*(wheel / "backends" / "python").iterdir(), stub]:
        if src.is_dir():
            continue
        link = target / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src.resolve())
    return target.parent


def server_env(extra_preload: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [libdir] if libdir else []
    if env.get("LD_LIBRARY_PATH"):
        paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    if extra_preload:
        env["LD_PRELOAD"] = ":".join([*extra_preload, *filter(None, [env.get("LD_PRELOAD")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass
class TritonServer:
    """One tritonserver process. `start()` returns once every model is ready.

    `admin_key` opens the restricted management APIs (admin.py); default: admin.default_key()."""

    repository: Path
    ports: Ports = field(default_factory=Ports)
    build_dir: Path = Path("build")
    address: str = "127.0.0.1"
    log_file: Path | None = None
    preload: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    admin_key: str | None = None
    process: subprocess.Popen | None = None
    _stubs: list | None = field(default=None, repr=False)  # the stub processes when the stop began

    def __post_init__(self):
        self.admin_key = admin.check(self.admin_key) if self.admin_key else admin.default_key()

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports.grpc}"

    def command(self) -> list[str]:
        return [
            str(find_tritonserver()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory(self.build_dir)}",
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}", f"--metrics-port={self.ports.metrics}",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            *admin.server_args(self.admin_key),
            *self.extra_args,
        ]

    def start(self, timeout: float = 300.0, log=print) -> "TritonServer":
        for name, port in vars(self.ports).items():
            if not port_free(self.address, port):
                raise ServerError(f"{name} port {port} on {self.address} is already in use")
        out = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL
        # in the repository: the tensorrtllm backend opens gpt_model_path, a link there, as given
        self.process = subprocess.Popen(self.command(), env=server_env(self.preload), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_stop_with_parent, cwd=self.repository)
        if self.log_file:
            out.close()
        try:
            self.wait_ready(timeout, log)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float, log=print) -> None:
        deadline = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} while starting{_tail(self.log_tail())}")
            if self._get("/v2/health/ready") == 200:
                return
            if time.monotonic() - last > 10:
                log(f"waiting for tritonserver on {self.http_url} ...")
                last = time.monotonic()
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s{_tail(self.log_tail())}")

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log ("" without a log file)."""
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def children(self) -> list[psutil.Process]:
        """The Python-backend stub processes (and anything else) the server started."""
        if not self.process:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def begin_stop(self) -> None:
        """SIGINT, once: Triton ends in-flight work (the models end their generations when they see
        it, backend/lifecycle.py) and unloads every model."""
        if self.process is not None and self.process.poll() is None and self._stubs is None:
            self._stubs = self.children()
            self.process.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 30.0, settle: float = 2.0) -> None:
        """SIGINT (unless begin_stop sent it), wait; then SIGKILL what is left, the server's stub
        processes included (by PID).

        Once every stub has exited the server has nothing left to finish; if it is still up
        `settle` seconds later, it waits for clients: Triton 2.51 keeps the model of the first
        request of each open gRPC stream loaded until the client closes that stream, and its gRPC
        endpoint does not close while a stream is open (graceful gRPC shutdown came in 25.05). It
        is killed then instead of waiting out the exit timeout and more."""
        if not self.process:
            return
        self.begin_stop()
        stubs, deadline, idle_since = self._stubs or [], time.monotonic() + timeout, None
        while self.process.poll() is None and time.monotonic() < deadline:
            if stubs and not any(_running(p) for p in stubs):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= settle:
                    break
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        _, alive = psutil.wait_procs(stubs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.process, self._stubs = None, None

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(text: str) -> str:
    return "\n--- server log (tail) ---\n" + text if text else ""


def _stop_with_parent() -> None:
    """In the child: get SIGINT when the process that started the server dies, so a killed test
    run or launcher never leaves a server (and its stubs) behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    except (OSError, AttributeError):  # not Linux: stop() is still called on every normal exit
        pass


def port_free(address: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


def free_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    """Ports the OS reports free now (for tests that start servers)."""
    import socket

    socks, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((address, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class OpenAIServer:
    """The OpenAI-compatible endpoint (qwen3vl_triton.api.openai_server) for a running tritonserver,
    as a child process on the same address; `start()` returns once it answers."""

    grpc_url: str
    address: str
    port: int
    settings: object  # repository.Settings: max_output_len, the image URL policy, the request bounds
    log_file: Path | None = None
    model: str = "qwen3vl"  # the Triton model it calls: qwen3vl, or qwen3vl_disagg on an encoder server
    process: subprocess.Popen | None = None
    _stopping: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"{self.address}:{self.port}"

    def command(self) -> list[str]:
        s = self.settings
        return [sys.executable, "-m", "qwen3vl_triton.api.openai_server", "--grpc-url", self.grpc_url,
                "--model", self.model,
                "--host", self.address, "--port", str(self.port), "--max-output-len", str(s.max_output_len),
                "--image-url-hosts", s.image_url_hosts, "--image-url-max-bytes", str(s.image_url_max_bytes),
                "--image-url-timeout-ms", str(s.image_url_timeout_ms),
                # the model's bounds, checked before a request is forwarded (the body's before it is read)
                "--max-request-bytes", str(s.max_request_bytes), "--max-text-bytes", str(s.text_bytes),
                "--max-image-bytes", str(s.max_image_bytes), "--max-images", str(s.max_images),
                "--max-video-bytes", str(s.max_video_bytes), "--max-videos", str(s.max_videos),
                "--header-timeout-ms", str(s.openai_header_timeout_ms),
                "--body-timeout-ms", str(s.openai_body_timeout_ms),
                "--max-connections", str(s.openai_max_connections),
                "--body-budget-bytes", str(s.openai_body_budget_bytes)]

    def start(self, timeout: float = 60.0) -> "OpenAIServer":
        if not port_free(self.address, self.port):
            raise ServerError(f"openai port {self.port} on {self.address} is already in use")
        out = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_stop_with_parent)
        if self.log_file:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the OpenAI server exited with code {self.process.returncode} while starting")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"the OpenAI server was not ready on {self.url} after {timeout:.0f}s")

    def begin_stop(self) -> None:
        """SIGINT, once: uvicorn stops accepting and lets the requests it serves end (a second
        SIGINT would cut them)."""
        if self.process is not None and self.process.poll() is None and not self._stopping:
            self._stopping = True
            self.process.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.begin_stop()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process, self._stopping = None, False

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
