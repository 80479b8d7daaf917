"""`python -m client`: generate (gRPC, HTTP, streaming or not, --stats) and disagg, against the real server;
every failure is one line on stderr and exit code 1."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from client import Client
from client.cli import main
from qwen3vl_triton.serve.server import free_ports
from tests.oracle import image_bytes

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-images")
    paths = []
    for i, (w, h, fmt) in enumerate([(96, 64, "PNG"), (64, 120, "JPEG")]):
        p = d / f"img{i}.{fmt.lower()}"
        p.write_bytes(image_bytes(w, h, 40 + i, fmt=fmt))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def expected(server, images):
    """Greedy text of the library client for the same request (the CLI must print exactly this)."""
    with Client(server.grpc_url, "grpc") as c:
        return c.generate_text(PROMPT, [p.read_bytes() for p in images], max_tokens=24)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_grpc_streams_the_library_text(server, images, expected, capsys):
    code, out, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--image", *images,
                             "--prompt", PROMPT, "--max-tokens", 24)
    assert code == 0, err
    assert out == expected + "\n"
    assert err == ""


def test_generate_http_with_stats_prints_ttft_itl_and_tokens_per_second_to_stderr(server, images, expected, capsys):
    code, out, err = run_cli(capsys, "generate", "--url", server.http_url, "--protocol", "http",
                             "--image", images[0], "--image", images[1], "--prompt", PROMPT, "--max-tokens", 24,
                             "--stats")
    assert code == 0, err
    assert out == expected + "\n"  # the stats never mix with the text
    tokens = int(re.search(r"^tokens: (\d+)", err, re.M).group(1))
    assert 1 <= tokens <= 24  # one streamed response per generated token; the model may end the turn early
    assert "TTFT: " in err and " ms" in err
    assert "inter-token latency: mean" in err and "p90" in err
    assert "tokens/s: " in err


def test_generate_no_stream_gives_the_same_text_in_one_piece(server, images, expected, capsys):
    code, out, err = run_cli(capsys, "generate", "--url", server.http_url, "--protocol", "http", "--image",
                             *images, "--prompt", PROMPT, "--max-tokens", 24, "--no-stream", "--stats")
    assert code == 0, err
    assert out == expected + "\n"
    assert "--no-stream" in err and "total:" in err


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_disagg_prints_the_single_server_text(transport, server, images, expected, capsys):
    code, out, err = run_cli(capsys, "disagg", "--encoder-url", server.grpc_url, "--language-url", server.grpc_url,
                             "--transport", transport, "--chunk-rows", 5, "--image", *images, "--prompt", PROMPT,
                             "--max-tokens", 24, "--stats")
    assert code == 0, err
    assert out == expected + "\n"
    assert f"table transfer ({transport}):" in err and "chunks" in err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_down_is_one_clear_line(protocol, capsys):
    (port,) = free_ports(1)  # nothing listens there
    code, out, err = run_cli(capsys, "generate", "--url", f"127.0.0.1:{port}", "--protocol", protocol,
                             "--prompt", "hi")
    assert_one_line_error(code, err, "cannot reach the server", f"127.0.0.1:{port}", protocol)


def test_disagg_with_the_language_server_down_is_one_clear_line(server, capsys):
    (port,) = free_ports(1)
    code, _, err = run_cli(capsys, "disagg", "--encoder-url", server.grpc_url, "--language-url",
                           f"127.0.0.1:{port}", "--prompt", "hi")
    assert_one_line_error(code, err, "cannot reach the server", f"127.0.0.1:{port}")


def test_model_not_ready_is_one_clear_line(server, capsys):
    code, _, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--model", "qwen3vl_missing", "--prompt", "hi")
    assert_one_line_error(code, err, "model 'qwen3vl_missing' is not ready")


def test_bad_input_from_the_server_is_one_line(server, capsys):
    code, _, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--prompt", "hi", "--max-tokens", 100000)
    assert_one_line_error(code, err, "max_tokens")


def test_undecodable_image_is_one_line_naming_the_image(server, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    for argv in (["generate", "--url", server.http_url, "--protocol", "http"],
                 ["disagg", "--encoder-url", server.grpc_url, "--language-url", server.grpc_url]):
        code, _, err = run_cli(capsys, *argv, "--image", bad, "--prompt", "hi")
        assert_one_line_error(code, err, "image")


def test_missing_image_file_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--url", "127.0.0.1:1", "--image", tmp_path / "nope.png",
                           "--prompt", "hi")
    assert_one_line_error(code, err, "nope.png", "no such file")


def test_python_dash_m_client_exit_codes(server):
    """The module entry point: text on stdout and 0; an unreachable server gives 1 and no traceback."""
    ok = subprocess.run([sys.executable, "-m", "client", "generate", "--url", server.grpc_url, "--prompt", "Hello",
                         "--max-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("\n") and len(ok.stdout) > 1
    (port,) = free_ports(1)
    down = subprocess.run([sys.executable, "-m", "client", "generate", "--url", f"127.0.0.1:{port}",
                           "--prompt", "Hello"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach the server") and "Traceback" not in down.stderr


# -- conversations ---------------------------------------------------------------------------------
def test_save_alone_starts_a_conversation_and_messages_continues_it(server, images, expected, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    code, out, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--image", *images, "--prompt", PROMPT,
                             "--max-tokens", 24, "--save", chat)
    assert code == 0, err
    assert out == expected + "\n"  # the same prompt as one user turn: the same text
    saved = json.loads(chat.read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["content"] == expected
    code, out, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--messages", chat, "--prompt",
                             "And then?", "--max-tokens", 8, "--save", chat)
    assert code == 0, err
    assert [m["role"] for m in json.loads(chat.read_text())] == ["user", "assistant", "user", "assistant"]


def test_a_messages_file_not_there_yet_is_a_new_conversation(server, images, expected, tmp_path, capsys):
    chat = tmp_path / "new.json"
    code, out, err = run_cli(capsys, "generate", "--url", server.grpc_url, "--messages", chat, "--image", *images,
                             "--prompt", PROMPT, "--max-tokens", 24, "--save", chat)
    assert code == 0, err
    assert out == expected + "\n"
    assert [m["role"] for m in json.loads(chat.read_text())] == ["user", "assistant"]


@pytest.mark.parametrize("argv, what", [(["--messages", "{chat}"], "no such file yet"), (["--save", "{chat}"],
                                                                                         "--save alone")])
def test_a_new_conversation_without_a_prompt_is_one_line(argv, what, tmp_path, capsys):
    chat = tmp_path / "none.json"
    code, _, err = run_cli(capsys, "generate", "--url", "127.0.0.1:1", *[a.format(chat=chat) for a in argv])
    assert_one_line_error(code, err, what, "give --prompt to start the conversation")
    assert not chat.exists()


def test_the_client_is_installed_with_the_package(tmp_path):
    """`import client` and `python -m client` work from any folder (pyproject installs `client`), and the
    bundled image comes with it."""
    out = subprocess.run([sys.executable, "-c", "import client; print(client.__file__, client.SAMPLE_IMAGE.is_file())"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "client" / "__init__.py"), "True"]
