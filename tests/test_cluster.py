"""The loopback cluster (python -m qwen3vl_triton.serve.cluster, `make cluster`): its servers, its
cluster.json, its front door (Triton and the OpenAI endpoint), and its stop."""

import json
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from client import Client
from qwen3vl_triton.serve.server import free_ports
from tests.conftest import ROOT
from tests.oracle import image_bytes

pytestmark = pytest.mark.server


def test_a_cluster_of_one_encoder_and_two_language_servers(tiny_checkpoint, tmp_path, oracle):
    from openai import OpenAI

    http, grpc, openai_port = free_ports(3)
    build = tmp_path / "build"
    proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_triton.serve.cluster", "--encoders", "1",
                             "--languages", "2",
                             "--checkpoint", str(tiny_checkpoint), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--openai-port", str(openai_port), "--build-dir", str(build),
                             "--set", "max_output_len=64", "--set", "max_seq_len=2048"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        def read():
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("ready:"):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(900)
        assert lines and lines[-1].startswith("ready:"), "".join(lines[-20:])
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        servers = json.loads((build / "cluster.json").read_text())
        assert sorted(s["role"] for s in servers) == ["encoder", "language", "language"]
        front = next(s for s in servers if s["role"] == "encoder")
        assert (front["http"], front["grpc"]) == (http, grpc)
        for s in servers:
            assert psutil.pid_exists(s["pid"]) and psutil.pid_exists(s["tritonserver_pid"])
            assert len({s["http"], s["grpc"], s["metrics"]}) == 3
        prompt, images, n = "Describe this image in short.", [image_bytes(100, 150, 1)], 16
        expected = oracle.text(oracle.generate(prompt, images, n))
        with Client(f"127.0.0.1:{grpc}", model="qwen3vl_disagg") as c:
            assert c.generate_text(prompt, images, max_tokens=n) == expected
        chat = OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused")
        r = chat.chat.completions.create(model="qwen3vl", max_tokens=8,
                                         messages=[{"role": "user", "content": "Tell me about the ocean."}])
        assert r.choices[0].message.content == oracle.text(oracle.generate("Tell me about the ocean.", [], 8))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0
        for s in servers:
            assert not psutil.pid_exists(s["tritonserver_pid"]) or \
                psutil.Process(s["tritonserver_pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
