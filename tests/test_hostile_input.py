"""Hostile values in every field of both front doors, through the real servers: a 400 (INVALID_ARG
over gRPC) naming the field, never a 500 or an "internal error", and the servers keep serving.

The cases are generated from two tables: the fields of each entry point (the OpenAI endpoint's body;
`qwen3vl`'s inputs over Triton's HTTP generate_stream and gRPC, with the fields inside its `messages`
JSON) and the classes of hostile values (an integer of 400 digits, 100,000 nested arrays, 40 nested
arrays (parsed by json, refused by depth), lone surrogates as JSON escapes or as their 3-byte encoding,
bytes that are not UTF-8). A second table does the same for every way an image is too large: sizes
declared in PNG, GIF, JPEG, TIFF, WebP and BMP headers, Pillow's own decompression-bomb guard (a PPM),
and real pixels over the limit.

Triton 2.51's own HTTP frontend parses the outer JSON of generate_stream before any model sees it;
what its parser refuses it answers with 500 (a number too big for a double, a `\\ud800` escape not
followed by its pair). Those cells are strict xfails: they document Triton's behaviour, not ours. Its
parser also overflows the stack on deep nesting (tritonserver dies on ~40,000 nested arrays), so no
case nests arrays in the outer JSON of Triton's endpoint; docs/security.md says to put a proxy in front.
"""

import base64
import io
import json
import re
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen3vl_triton.serve.repository import Settings
from qwen3vl_triton.serve.server import OpenAIServer, free_ports
from tests.conftest import SERVER_SETTINGS
from tests.oracle import data_url, image_bytes
from tests.test_server_errors import stream_once, tensor

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    srv = OpenAIServer(server.grpc_url, "127.0.0.1", free_ports(1)[0], Settings(**SERVER_SETTINGS),
                       log_file=tmp_path_factory.mktemp("hostile") / "openai.log").start()
    yield srv
    srv.stop()


MARK = "\x00HOSTILE\x00"  # where the hostile JSON text goes: json.dumps writes it as below
MARK_JSON = json.dumps(MARK).encode()


# -- the classes of hostile values ----------------------------------------------------------------------
class Hostile:
    """One class: its JSON text, its bytes as a string input (None: no such bytes), the message."""

    def __init__(self, json_text: bytes, raw: bytes | None, message: str, nested: bool = False):
        self.json_text, self.raw, self.message, self.nested = json_text, raw, message, nested


CLASSES = {
    "huge integer": Hostile(b"9" * 400, None, "is a 400-digit integer, out of range"),
    "100000 nested arrays": Hostile(b"[" * 100_000 + b"]" * 100_000, None, "is nested more than 32 levels deep",
                                    nested=True),
    "40 nested arrays": Hostile(b"[" * 40 + b"]" * 40, None, "is nested more than 32 levels deep", nested=True),
    "lone low surrogate": Hostile(b'"ab\\udfffc"', b"ab\xed\xbf\xbfc", "lone surrogate (U+DFFF)"),
    "lone high surrogate": Hostile(b'"ab\\ud800c"', b"ab\xed\xa0\x80c", "lone surrogate (U+D800)"),
    "not UTF-8": Hostile(b'"ab\xff\xfec"', b"ab\xff\xfec", "is not valid UTF-8 (byte 2: invalid start byte)"),
}
TEXT_CLASSES = ("lone low surrogate", "lone high surrogate", "not UTF-8")  # for string inputs of Triton


def put(body, path: str, value):
    """body with `path` ("messages[0].content[1].image_url.url") set to value."""
    keys = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        keys.append(int(part) if part.isdigit() else part)
    at = body
    for key in keys[:-1]:
        at = at[key]
    at[keys[-1]] = value
    return body


def with_hostile(body: dict, path: str, hostile: Hostile) -> bytes:
    """JSON text of body with the hostile value's JSON text at `path` (raw bytes, not re-encoded)."""
    text = json.dumps(put(body, path, MARK)).encode()
    assert text.count(MARK_JSON) == 1
    return text.replace(MARK_JSON, hostile.json_text)


def json_string(raw: bytes) -> bytes:
    """raw as a JSON string literal, its bytes kept (the outer JSON of Triton's HTTP endpoint)."""
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def assert_names(message: str, field: str, hostile: Hostile) -> None:
    assert "internal error" not in message and "Traceback" not in message, message
    assert hostile.message in message, message
    if hostile.nested:  # named by the path down to where it nests too deep (its first four steps)
        named = re.search(r"([A-Za-z_][\w.\[\]]*): is nested", message).group(1)
        assert named.startswith(field) or field.startswith(named), (field, message)
    else:
        assert f"{field}: " in message, (field, message)


IMG = image_bytes(40, 30, 5)


def conversation() -> list:
    return [{"role": "user", "name": "someone", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url(IMG)}}]}]


# -- the OpenAI endpoint --------------------------------------------------------------------------------
OPENAI_FIELDS = [
    "model", "messages", "messages[0]", "messages[0].role", "messages[0].name", "messages[0].content",
    "messages[0].content[0].text", "messages[0].content[1].image_url", "messages[0].content[1].image_url.url",
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop", "stop[0]", "user",
    "stream", "stream_options", "tools", "logit_bias", "response_format", "metadata",
]


def openai_body() -> dict:
    return {"model": "qwen3vl", "max_tokens": 4, "messages": conversation(), "stop": ["never seen"]}


def post(url: str, body: bytes) -> tuple[int, dict | str, str]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode("utf-8", "replace"), resp.headers.get_content_type()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace"), err.headers.get_content_type()


@pytest.mark.parametrize("field", OPENAI_FIELDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_openai_endpoint_names_the_field(kind, field, api):
    hostile = CLASSES[kind]
    status, body, content_type = post(f"http://{api.url}/v1/chat/completions",
                                      with_hostile(openai_body(), field, hostile))
    assert status == 400 and content_type == "application/json", (status, body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert_names(error["message"], field, hostile)
    assert error["message"].startswith(f"{error['param']}: "), error


# -- Triton: qwen3vl over HTTP generate_stream and gRPC ---------------------------------------------------
MESSAGES_FIELDS = ["messages", "messages[0]", "messages[0].role", "messages[0].name", "messages[0].content",
                   "messages[0].content[0].text", "messages[0].content[1].image_url.url"]
STRING_INPUTS = {"text_input": "text_input", "stop_words": "stop_words[0]", "image": "image[0]"}


def messages_text(field: str, hostile: Hostile) -> bytes:
    """The `messages` input's JSON text with the hostile value at `field` (a path inside it)."""
    inner = field.removeprefix("messages")
    if not inner:
        return hostile.json_text
    return with_hostile({"messages": conversation()}, "messages" + inner, hostile)[len(b'{"messages": '):-1]


def triton_http(server, body: bytes) -> tuple[int, str]:
    status, text, _ = post(f"http://{server.http_url}/v2/models/qwen3vl/generate_stream", body)
    return status, text


def triton_grpc(server, inputs) -> str:
    results, errors = stream_once(server, "qwen3vl", inputs)
    assert len(errors) == 1 and not [r for r in results if r.get_response().outputs], (results, errors)
    return errors[0].message()  # (a stream's error carries no status code: HTTP's 400 shows INVALID_ARG)


def string_tensor(name, values: list[bytes]):
    return tensor(name, np.array([values], dtype=np.object_), "BYTES")


MAX_TOKENS = tensor("max_tokens", np.array([[4]], np.int32), "INT32")


@pytest.mark.parametrize("field", MESSAGES_FIELDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_triton_http_messages_names_the_field(kind, field, server):
    hostile = CLASSES[kind]
    status, text = triton_http(server, b'{"max_tokens": 4, "messages": ' + json_string(messages_text(field, hostile))
                               + b"}")
    assert status == 400, (status, text)
    assert_names(text, field, hostile)


@pytest.mark.parametrize("field", MESSAGES_FIELDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_triton_grpc_messages_names_the_field(kind, field, server):
    hostile = CLASSES[kind]
    message = triton_grpc(server, [string_tensor("messages", [messages_text(field, hostile)]), MAX_TOKENS])
    assert_names(message, field, hostile)


def string_input_expectation(name: str, hostile: Hostile) -> Hostile:
    if name == "image":  # an image is bytes, not text: it is refused as what it is not
        return Hostile(hostile.json_text, hostile.raw, "image[0]: cannot be decoded: not an image file")
    return hostile


TRITON_REFUSES = pytest.mark.xfail(strict=True, raises=AssertionError,
                                   reason="Triton 2.51's HTTP frontend refuses this JSON itself, with a 500 (its "
                                          "parser), before any model sees it")


@pytest.mark.parametrize("name", list(STRING_INPUTS))
@pytest.mark.parametrize("kind", [pytest.param(k, marks=TRITON_REFUSES) if k == "lone high surrogate" else k
                                  for k in TEXT_CLASSES])
def test_triton_http_string_inputs_name_the_input(kind, name, server):
    hostile = string_input_expectation(name, CLASSES[kind])
    body = {"text_input": "Hi.", "max_tokens": 4, **({name: [MARK]} if name != "text_input" else {})}
    field = STRING_INPUTS[name]
    status, text = triton_http(server, with_hostile(body, field if name == "text_input" else f"{name}[0]",
                                                    CLASSES[kind]))
    assert status == 400, (status, text)
    assert_names(text, field, hostile)


@pytest.mark.parametrize("name", list(STRING_INPUTS))
@pytest.mark.parametrize("kind", TEXT_CLASSES)
def test_triton_grpc_string_inputs_name_the_input(kind, name, server):
    hostile = string_input_expectation(name, CLASSES[kind])
    inputs = {"text_input": [b"Hi."], name: [CLASSES[kind].raw]}
    message = triton_grpc(server, [string_tensor(k, v) for k, v in inputs.items()] + [MAX_TOKENS])
    assert_names(message, STRING_INPUTS[name], hostile)


@TRITON_REFUSES
@pytest.mark.parametrize("name", ["max_tokens", "temperature", "top_k", "top_p", "seed"])
def test_triton_http_huge_numbers_are_a_400(name, server):
    body = {"text_input": "Hi.", "max_tokens": 4, name: MARK}
    status, text = triton_http(server, with_hostile(body, name, CLASSES["huge integer"]))
    assert status == 400, (status, text)


# -- images too large, every way ------------------------------------------------------------------------
def png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def gif(screen, frame):
    return (b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
            + b"\x02\x02\x44\x01\x00\x3b")


def jpeg(width, height):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff(width, height):
    entries = struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0)


def webp_vp8x(width, height):
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def webp_vp8l(width, height):
    bits = (width - 1) | (height - 1) << 14
    body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits) + b"\x00"
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def bmp(width, height):
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0,
                                                                     0, 0, 0, 0, 0)


def solid_png(width, height):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(buf, "PNG")
    return buf.getvalue()


LIMIT = SERVER_SETTINGS["max_image_pixels"]
IMAGES = {  # name: (file, width, height); None: only the pixel count is known (Pillow's guard)
    "PNG header 20000x20000": (png_header(20000, 20000), 20000, 20000),
    "PNG header 1000000x1000000": (png_header(1_000_000, 1_000_000), 1_000_000, 1_000_000),
    "GIF screen 65535x65535": (gif((65535, 65535), (1, 1)), 65535, 65535),
    "GIF frame larger than its screen": (gif((10, 10), (30000, 30000)), 30000, 30000),
    "JPEG SOF 65000x65000": (jpeg(65000, 65000), 65000, 65000),
    "TIFF 100000x100000": (tiff(100_000, 100_000), 100_000, 100_000),
    "WebP VP8X 16384x16384": (webp_vp8x(16384, 16384), 16384, 16384),
    "WebP VP8L 16384x16384": (webp_vp8l(16384, 16384), 16384, 16384),
    "BMP 30000x30000": (bmp(30000, 30000), 30000, 30000),
    "PPM 20000x20000 (Pillow's guard)": (b"P6\n20000 20000\n255\n" + b"\x00" * 64, None, 400_000_000),
    "PNG 1500x1000 pixels": (solid_png(1500, 1000), 1500, 1000),
}


def too_large(name: str, case: str) -> str:
    _, width, height = IMAGES[case]
    if width is None:
        return f"{name}: is {height} pixels, above the limit of {LIMIT}"
    return f"{name}: is {width}x{height} = {width * height} pixels, above the limit of {LIMIT}"


@pytest.mark.parametrize("door", ["openai", "triton http", "triton grpc"])
@pytest.mark.parametrize("case", list(IMAGES))
def test_an_image_too_large_says_its_size_and_the_limit(case, door, server, api):
    data = IMAGES[case][0]
    if door == "openai":
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/x;base64," + base64.b64encode(data).decode()}}]}]
        status, body, _ = post(f"http://{api.url}/v1/chat/completions", json.dumps(
            {"model": "qwen3vl", "messages": messages, "max_tokens": 4}).encode())
        assert status == 400, (status, body)
        error = json.loads(body)["error"]
        assert error["message"] == too_large("messages[0].content[0].image_url", case), error
        assert error["param"] == "messages[0].content[0].image_url"
    elif door == "triton http":
        status, text = triton_http(server, json.dumps({"text_input": "What is it?", "max_tokens": 4,
                                                       "image": [base64.b64encode(data).decode()]}).encode())
        assert status == 400 and too_large("image[0]", case) in text, (status, text)
    else:
        message = triton_grpc(server, [string_tensor("text_input", [b"What is it?"]), string_tensor("image", [data]),
                                       MAX_TOKENS])
        assert too_large("image[0]", case) in message, message


def test_the_servers_keep_serving(server, api, oracle):
    from client import Client

    with Client(server.grpc_url, "grpc") as c:
        oracle.assert_served(c.generate_text("After hostile input.", max_tokens=6),
                             oracle.generate("After hostile input.", [], 6))
    messages = [{"role": "user", "content": "After hostile input."}]
    status, body, _ = post(f"http://{api.url}/v1/chat/completions",
                           json.dumps({"model": "qwen3vl", "messages": messages, "max_tokens": 6}).encode())
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == oracle.text(oracle.generate_messages(messages, 6))
