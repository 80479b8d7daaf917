"""qwen3vl-serve: renders, waits for readiness, prints `ready:`, and stops everything on a signal."""

import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from qwen3vl_triton.serve.server import free_ports

pytestmark = pytest.mark.server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_ready_and_stops_the_server_and_its_stubs(sig, tiny_checkpoint, tmp_path):
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen3vl_triton.serve.launcher",
            "--checkpoint",
            str(tiny_checkpoint),
            "--topology",
            "language",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--build-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "QWEN3VL_ADMIN_KEY"},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("ready:", "error:")):
                break
        assert lines and lines[-1].startswith(f"ready: http=127.0.0.1:{http} grpc=127.0.0.1:{grpc}"), "".join(lines)
        assert "models=language,postprocessing,tensorrt_llm engine=ggml dtype=float32" in lines[-1]
        # the default engine's weights were converted into the build folder before tritonserver started
        weights = next(i for i, line in enumerate(lines) if line.startswith("[ggml] weights: "))
        assert weights < next(i for i, line in enumerate(lines) if line.startswith("starting tritonserver"))
        assert len(list((tmp_path / "ggml").glob("*-f32-*.gguf"))) == 1
        # no key given: a random one, in a file only this user can read, and the ready line says where
        key_file = tmp_path / f"admin-key-language-{grpc}"  # one file per server: topology and gRPC port
        assert lines[-1].rstrip().endswith(f"admin-key={key_file}")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32 and key not in "".join(lines)  # never printed
        assert _get(http, "/v2/logging") == 403
        assert _get(http, "/v2/logging", {"admin-key": key}) == 200
        server = [p for p in psutil.Process(proc.pid).children() if "tritonserver" in p.name()]
        assert len(server) == 1
        stubs = server[0].children(recursive=True)
        assert len(stubs) == 3  # one Python-backend stub per model
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs([server[0], *stubs], timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get(port, path, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {}),
                                    timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_serve_refuses_an_admin_key_triton_cannot_take(tiny_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QWEN3VL_ADMIN_KEY"}
    out = subprocess.run([sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--checkpoint", str(tiny_checkpoint),
                          "--build-dir", str(tmp_path), "--admin-key", "short:key=1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert ("error: --admin-key: an admin key is 16 to 256 characters from A-Z, a-z, 0-9, '_' and '-'"
            in out.stderr)
    assert not list(tmp_path.glob("admin-key*"))


def test_serve_reports_a_bad_setting_clearly(tiny_checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--checkpoint", str(tiny_checkpoint),
                          "--build-dir", str(tmp_path), "--set", "max_output_len=99999"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error: inconsistent settings: max_output_len 99999 leaves no room" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_a_port_in_use(tiny_checkpoint, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        http, metrics = free_ports(2)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen3vl_triton.serve.launcher",
                "--checkpoint",
                str(tiny_checkpoint),
                "--build-dir",
                str(tmp_path),
                "--http-port",
                str(http),
                "--grpc-port",
                str(busy),
                "--metrics-port",
                str(metrics),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1
    assert f"error: grpc port {busy} on 127.0.0.1 is already in use" in out.stderr


def test_serve_with_openai_port_starts_and_stops_the_openai_endpoint(tiny_checkpoint, tmp_path):
    import json
    import urllib.request

    http, grpc, metrics, openai = free_ports(4)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen3vl_triton.serve.launcher",
            "--checkpoint",
            str(tiny_checkpoint),
            "--topology",
            "single",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--openai-port",
            str(openai),
            "--build-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("ready:", "error:")):
                break
        assert lines[-1].rstrip().endswith(f"openai=http://127.0.0.1:{openai}/v1"), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{openai}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "qwen3vl"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("openai_server" in " ".join(p.cmdline()) for p in children)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("topology", ["language", "encoder"])  # an encoder server without language_urls
def test_serve_refuses_openai_port_without_qwen3vl(tiny_checkpoint, tmp_path, topology):
    out = subprocess.run([sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--checkpoint", str(tiny_checkpoint),
                          "--topology", topology, "--openai-port", "9", "--build-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and ("error: --openai-port needs the qwen3vl model, or qwen3vl_disagg (topology encoder "
                                    f"with language_urls); topology {topology} has neither") in out.stderr


def test_check_prints_the_memory_of_each_dtype_and_the_engine(tiny_checkpoint, tmp_path):
    def check(*sets):
        return subprocess.run([sys.executable, "-m", "qwen3vl_triton.serve.launcher", "--checkpoint",
                               str(tiny_checkpoint), "--check", *(a for s in sets for a in ("--set", s))],
                              capture_output=True, text=True, timeout=120)

    out = check("engine_max_batch=4", "max_seq_len=1000", "max_output_len=500")
    assert out.returncode == 0, out.stderr
    for dtype in ("float32", "bfloat16", "q8_0", "q4_k"):
        line = next(x for x in out.stdout.splitlines() if x.strip().startswith(f"memory {dtype} "))
        assert "for 4 x 1000 tokens" in line and line.rstrip().endswith(("fits", "fits (ggml runner)")), line
    assert "serving engine   ggml (float32) (cpu_runner=auto, dtype=float32)" in out.stdout
    out = check("dtype=q8_0", "cpu_runner=torch")
    assert out.returncode == 1
    assert "quantized weights are served by the ggml runner only" in out.stdout
