"""The loopback cluster (python -m qwen3vl_triton.serve.cluster, `make cluster`): its servers, its
cluster.json, its front door (Triton and the OpenAI endpoint), a Locust run against it with the
spread over its language servers, the cluster bench against a pair, and its stop. One cluster (an
encoder + two language servers) for the whole module; the stop is the last test."""

import json
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from client import Client
from qwen3vl_triton.serve.server import free_ports
from tests.conftest import ROOT
from tests.oracle import image_bytes

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    http, grpc, openai_port = free_ports(3)
    build = tmp_path_factory.mktemp("cluster") / "build"
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
        yield SimpleNamespace(proc=proc, build=build, http=http, grpc=grpc, openai=openai_port,
                              servers=json.loads((build / "cluster.json").read_text()))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_cluster_of_one_encoder_and_two_language_servers(cluster, oracle):
    from openai import OpenAI

    servers = cluster.servers
    assert sorted(s["role"] for s in servers) == ["encoder", "language", "language"]
    assert [s["name"] for s in servers] == ["language-0", "language-1", "encoder-0"]
    front = next(s for s in servers if s["role"] == "encoder")
    assert (front["http"], front["grpc"], front["openai"]) == (cluster.http, cluster.grpc, cluster.openai)
    for s in servers:
        assert psutil.pid_exists(s["pid"]) and psutil.pid_exists(s["tritonserver_pid"])
        assert len({s["http"], s["grpc"], s["metrics"]}) == 3
    prompt, images, n = "Describe this image in short.", [image_bytes(100, 150, 1)], 16
    expected = oracle.text(oracle.generate(prompt, images, n))
    with Client(f"127.0.0.1:{cluster.grpc}", model="qwen3vl_disagg") as c:
        assert c.generate_text(prompt, images, max_tokens=n) == expected
    chat = OpenAI(base_url=f"http://127.0.0.1:{cluster.openai}/v1", api_key="unused")
    r = chat.chat.completions.create(model="qwen3vl", max_tokens=8,
                                     messages=[{"role": "user", "content": "Tell me about the ocean."}])
    assert r.choices[0].message.content == oracle.text(oracle.generate("Tell me about the ocean.", [], 8))


def test_locust_against_the_cluster_shows_the_spread_over_its_language_servers(cluster, tiny_checkpoint, tmp_path):
    from load_tests.run import read_stats

    cmd = [sys.executable, "-m", "load_tests.run", "--cluster", str(cluster.build / "cluster.json"), "--users", "2",
           "--duration", "6", "--stop-timeout", "30", "--max-tokens", "8", "--checkpoint", str(tiny_checkpoint),
           "--reports", str(tmp_path), "--prefix", "cluster"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "http 127.0.0.1:" in proc.stdout and f"grpc 127.0.0.1:{cluster.grpc}" in proc.stdout
    stats = read_stats(tmp_path / "cluster_stats.csv")
    requests = sum(int(stats[(kind, "generate")]["Request Count"]) for kind in ("HTTP", "gRPC"))
    assert requests > 0 and int(stats[("", "Aggregated")]["Failure Count"]) == 0
    spread = json.loads((tmp_path / "cluster_spread.json").read_text())
    assert set(spread["servers"]) == {"language-0", "language-1"}
    # every request of the run is one sequence on one language server (none moved)
    assert spread["total"] == requests == sum(s["sequences"] for s in spread["servers"].values())
    assert sum(s["share_of_mean"] for s in spread["servers"].values()) == pytest.approx(2)
    assert "sequences per language server" in proc.stdout and "language-1" in proc.stdout


def test_the_cluster_bench_reports_the_cluster_and_the_pair(cluster, tiny_checkpoint, tmp_path):
    """load_tests.bench_cluster on running servers: this cluster, and a pair of a new encoder server
    and the cluster's first language server (one server more, not two)."""
    from load_tests import bench_cluster
    from qwen3vl_triton.serve import cluster as loopback

    language = next(s for s in cluster.servers if s["role"] == "language")
    key = (cluster.build / f"admin-key-cluster-{cluster.grpc}").read_text().strip()
    args = loopback.parse_args(["--checkpoint", str(tiny_checkpoint), "--build-dir", str(tmp_path / "pair"),
                                "--admin-key", key, "--set", "max_output_len=64", "--set", "max_seq_len=2048"])
    encoder = loopback.Member("encoder", "pair-encoder", *free_ports(3))
    loopback.start(encoder, loopback.launcher_command(encoder, args, [f"language_urls=127.0.0.1:{language['grpc']}"]),
                   tmp_path / "pair" / "encoder.log")
    try:
        loopback.wait_ready(encoder, time.monotonic() + 600)
        (tmp_path / "pair.json").write_text(json.dumps([language, encoder.record()]))
        code = bench_cluster.main(["--cluster-json", str(cluster.build / "cluster.json"),
                                   "--pair-json", str(tmp_path / "pair.json"), "--rounds", "2", "--requests", "4",
                                   "--concurrency", "2", "--max-tokens", "8", "--routing-requests", "300",
                                   "--out-dir", str(tmp_path / "reports")])
    finally:
        loopback.stop_all([encoder])
    data = json.loads((tmp_path / "reports" / "bench-cluster-latest.json").read_text())
    assert code == 0, data["impossible"]
    assert set(data["table"]) == {"cluster", "pair"}
    assert (data["table"]["cluster"]["languages"], data["table"]["pair"]["languages"]) == (2, 1)
    for side in data["table"].values():
        assert side["requests"] == 8 and 0 < side["tokens"] <= 8 * 8
        for key in ("seconds", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "decode_ms_p50"):
            assert side[key] > 0, key
        assert side["ttft_p50_ms"] < 1e3 * side["seconds"]
    assert all(v > 0 for v in data["ratios"].values()) and set(data["ratios"]) == {
        "requests_per_s", "tokens_per_s", "ttft_p50", "itl_p50"}
    assert data["ratios"]["tokens_per_s"] == pytest.approx(
        data["table"]["cluster"]["tokens_per_s"] / data["table"]["pair"]["tokens_per_s"])
    assert data["spread"]["total"] == 8 and set(data["spread"]["servers"]) == {"language-0", "language-1"}
    assert data["same_outputs"]["differ"] == [] and data["same_outputs"]["cases"] > 0
    assert 0 < data["routing_overhead_ms"] < 1 and data["routing_met"]
    assert data["machine"]["read_gbps"] > 0 and data["machine"]["matmul_gflops"] > 0
    assert data["impossible"] == [] and data["environment"]["cpu_model"]


def test_the_cluster_stops_on_sigterm(cluster):
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(180) == 0
    for s in cluster.servers:
        assert not psutil.pid_exists(s["tritonserver_pid"]) or \
            psutil.Process(s["tritonserver_pid"]).status() == psutil.STATUS_ZOMBIE
