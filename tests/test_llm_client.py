"""How the Python models find the server that runs them (llm_client.server_grpc_url): the gRPC
endpoint read from the tritonserver command line, with Triton's defaults."""

import subprocess
import sys

import pytest

from qwen3vl_triton.clients.llm import server_grpc_url


@pytest.fixture
def process_with_args():
    procs = []

    def start(*args):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "up\n"  # its command line is the new one from here on
        return proc.pid

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(10)


@pytest.mark.parametrize("args, url", [
    ((), "127.0.0.1:8001"),  # Triton's defaults: every address, port 8001
    (("--grpc-port=9123",), "127.0.0.1:9123"),
    (("--grpc-address=127.0.0.1", "--grpc-port=8101"), "127.0.0.1:8101"),
    (("--grpc-address", "10.1.2.3", "--grpc-port", "7001"), "10.1.2.3:7001"),  # flag and value apart
    (("--grpc-address=::", "--grpc-port=8001"), "[::1]:8001"),
    (("--grpc-address=fd00::5",), "[fd00::5]:8001"),
    (("--grpc-address=triton", "--http-port=8000"), "triton:8001"),
])
def test_the_grpc_endpoint_comes_from_the_server_command_line(process_with_args, args, url):
    assert server_grpc_url(process_with_args(*args)) == url


def test_a_server_without_grpc_is_refused_with_a_reason(process_with_args):
    with pytest.raises(RuntimeError, match="--allow-grpc=false"):
        server_grpc_url(process_with_args("--allow-grpc=false"))
