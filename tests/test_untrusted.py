"""A client's JSON and text read within bounds (text/untrusted.py), and the sizes images declare in
their headers (text/image_size.py): no server, every failure an InputError naming the field."""

import io
import json
import time

import pytest
from PIL import Image

from qwen3vl_triton.errors import InputError
from qwen3vl_triton.text import untrusted
from qwen3vl_triton.text.image_size import declared_size
from qwen3vl_triton.text.preprocess import Limits, encoded_size, parse_messages


def refused(raw, name="", root=None) -> InputError:
    with pytest.raises(InputError) as err:
        untrusted.loads(raw, name, root)
    assert str(err.value).startswith(f"{err.value.input}: ")
    return err.value


@pytest.mark.parametrize("raw, field, message", [
    ('{"model": "\\udfff"}', "model", "contains a lone surrogate (U+DFFF) at character 0"),
    ('{"stop": ["ok", "a\\ud83d"]}', "stop[1]", "contains a lone surrogate (U+D83D) at character 1"),
    (b'{"model": "ab\xed\xbf\xbf"}', "model", "is not valid UTF-8: a lone surrogate (U+DFFF) is encoded at byte 2"),
    (b'{"messages": [{"content": "x\xff"}]}', "messages[0].content", "is not valid UTF-8 (byte 1: invalid start byte)"),
    (b'{"k\xff": 1}', "request (a key)", "is not valid UTF-8 (byte 1: invalid start byte)"),
    ('{"a\\udfff": 1}', "request (a key)", "contains a lone surrogate"),
    ('{"max_tokens": ' + "9" * 400 + "}", "max_tokens", "is a 400-digit integer, out of range"),
    ('{"seed": -' + "9" * 5000 + "}", "seed", "is a 5000-digit integer"),  # past int()'s 4300-digit limit
    ('{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}", "stop[0][0][0]", "is nested more than 32 levels deep"),
    ('{"messages": [{"content": ' + "[" * 40 + "]" * 40 + "}]}", "messages[0].content[0]",
     "is nested more than 32 levels deep"),
    ("[" + ",".join(["0"] * 1_000_001) + "]", "request", "has 1000001 JSON arrays, objects and commas"),
    ("{", "request", "is not valid JSON: Expecting property name"),
])
def test_hostile_json_is_refused_naming_the_field(raw, field, message):
    err = refused(raw)
    assert err.input == field and message in str(err), str(err)


def test_a_document_within_bounds_is_returned_as_json_reads_it():
    doc = {"model": "qwen3vl", "seed": 2**64 - 1, "temperature": 0.5, "stop": ["é", "😀"],
           "messages": [{"content": [[[[1]]]]}]}
    assert untrusted.loads(json.dumps(doc)) == doc
    assert untrusted.loads(json.dumps(doc).encode()) == doc
    assert untrusted.loads(json.dumps(doc, ensure_ascii=False).encode()) == doc


def test_inside_a_named_input_paths_start_with_its_name():
    assert refused('[{"role": "\\udfff"}]', "messages").input == "messages[0].role"
    assert refused("[" * 5000 + "]" * 5000, "messages").input == "messages[0][0][0][0]"
    assert refused("nope", "messages").input == "messages"


def test_large_documents_are_checked_in_linear_time_without_copies_per_value():
    big = json.dumps({"messages": [{"content": "A" * 50_000_000}], "n": list(range(200_000))})
    start = time.perf_counter()
    untrusted.loads(big)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("value, message", [
    (b"ok", None), ("ok", None), (b"\xe2\x82\xac", None),
    (b"a\xed\xa0\x80", "text_input: is not valid UTF-8: a lone surrogate (U+D800) is encoded at byte 1"),
    (b"\xff", "text_input: is not valid UTF-8 (byte 0: invalid start byte)"),
    ("a\udfff", "text_input: contains a lone surrogate (U+DFFF) at character 1"),
])
def test_string_inputs_are_utf8_strictly(value, message):
    if message is None:
        assert untrusted.text(value, "text_input") == (value.decode() if isinstance(value, bytes) else value)
        return
    with pytest.raises(InputError) as err:
        untrusted.text(value, "text_input")
    assert str(err.value).startswith(message), str(err.value)


def test_messages_reuse_the_bounds_and_measure_images_without_copying():
    url = "data:image/png;base64," + "A" * 4000
    conversation, images, names = parse_messages(json.dumps(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]), Limits())
    assert images == [url] and names == ["messages[0].content[0].image_url"]
    assert encoded_size(url) == encoded_size(url.encode()) == 3000
    with pytest.raises(InputError) as err:  # a client's value is shown cut short
        parse_messages([{"role": "x" * 1000, "content": "hi"}], Limits())
    assert str(err.value) == "messages[0].role: '" + "x" * 59 + "... (1002 characters) is not one of system, " \
                             "user, assistant (or developer)"


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("GIF", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                     ("TIFF", {}), ("TIFF", {"compression": "tiff_deflate"}), ("WEBP", {}),
                                     ("WEBP", {"lossless": True}), ("BMP", {})])
def test_declared_sizes_agree_with_pillow(fmt, kw):
    buf = io.BytesIO()
    Image.new("RGB", (123, 45), (10, 20, 30)).save(buf, fmt, **kw)
    width, height, _ = declared_size(buf.getvalue())
    assert (width, height) == Image.open(io.BytesIO(buf.getvalue())).size == (123, 45)


def test_declared_size_of_what_is_not_an_image_is_none():
    for data in (b"", b"\x89PNG", b"BM" + b"x" * 26, b"QkVBQUFBQUFB" * 4, b"RIFF1234WEBPVP8 ", b"\xff\xd8\xff"):
        assert declared_size(data) is None, data
