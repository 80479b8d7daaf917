"""Preprocessing: prompt layout, image decoding, resize bounds, placeholder expansion, bad input."""

import base64
import struct
import zlib

import numpy as np
import pytest

from qwen3vl_triton.errors import InputError
from qwen3vl_triton.text.preprocess import decode_image
from tests.oracle import image_bytes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_encoded_files_base64_and_data_urls(fmt):
    raw = image_bytes(40, 30, fmt=fmt)
    b64 = base64.b64encode(raw)
    for data in (raw, b64, b64.decode(), b"data:image/" + fmt.lower().encode() + b";base64," + b64):
        img = decode_image(data, "image[0]")
        assert img.size == (40, 30) and img.mode == "RGB"


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, message", [
    (b"definitely not an image", "image[2]: cannot be decoded"),
    (b"", "image[2]: is empty"),
    (_png_header(0, 10), "image[2]: has zero size"),
    (b"data:image/png,abc", "image[2]: a data URL must look like"),
    (b"data:image/png;base64,@@@@", "image[2]: is not valid base64"),
    (image_bytes(64, 64)[:200], "image[2]: cannot be decoded"),  # truncated pixel data
])
def test_bad_images_name_the_input(data, message):
    with pytest.raises(InputError) as err:
        decode_image(data, "image[2]")
    assert str(err.value).startswith(message)
    assert err.value.input == "image[2]"


def test_image_above_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(InputError, match=r"image\[0\]: is 300x200 = 60000 pixels, above the limit of 50000"):
        decode_image(image_bytes(300, 200), "image[0]", max_pixels=50_000)


def test_prompt_layout_is_images_then_text_in_one_user_turn(preprocessor, oracle):
    text = preprocessor.chat_text("What is this?", 2)
    expected = oracle.tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is this?"}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected
    assert text.index("<|image_pad|>") < text.rindex("<|image_pad|>") < text.index("What is this?")
    assert text.endswith("<|im_start|>assistant\n")


def test_placeholders_expand_to_consecutive_table_ids(preprocessor, oracle, spec):
    images = [image_bytes(100, 150, 1), image_bytes(200, 64, 2)]
    p = preprocessor("Compare them.", images)
    ref = oracle.inputs("Compare them.", images)
    fake = p.input_ids >= spec.vocab_size
    # the same sequence as the transformers user's, with each placeholder replaced by vocab + j
    restored = np.where(fake, spec.image_token_id, p.input_ids)
    assert restored.tolist() == ref.input_ids[0].tolist()
    assert (p.input_ids[fake] - spec.vocab_size).tolist() == list(range(p.num_image_tokens))
    assert p.num_image_tokens == int(ref.mm_token_type_ids.sum())
    np.testing.assert_array_equal(p.pixel_values, ref.pixel_values.numpy())
    np.testing.assert_array_equal(p.image_grid_thw, ref.image_grid_thw.numpy())


def test_resize_honours_the_checkpoint_pixel_bounds(preprocessor, spec):
    _, big = preprocessor.images([image_bytes(1000, 700)])
    _, small = preprocessor.images([image_bytes(20, 20)])
    patch_px = spec.patch_size ** 2
    assert int(big[0, 1] * big[0, 2]) * patch_px <= spec.max_pixels
    assert int(small[0, 1] * small[0, 2]) * patch_px >= spec.min_pixels
    assert all(int(g) % spec.spatial_merge_size == 0 for g in (*big[0, 1:], *small[0, 1:]))


def test_the_pixel_cache_gives_exactly_what_decoding_gives_and_stays_in_its_bound(spec, preprocessor):
    """A conversation's image, sent again, is not decoded again; the pixels are the same bits."""
    from qwen3vl_triton.text.preprocess import Preprocessor

    a, b = image_bytes(64, 48, 1), image_bytes(48, 64, 2)
    expected = [preprocessor.images([img]) for img in (a, b)]
    one = expected[0][0].nbytes + expected[0][1].nbytes
    cached = Preprocessor(spec, max_images=4, max_input_len=2048, pixel_cache_bytes=one)  # room for one image
    cache = cached.pixel_cache
    for _ in range(2):
        pv, grid = cached.images([a])
        assert np.array_equal(pv, expected[0][0]) and np.array_equal(grid, expected[0][1])
        pv[:] = 0  # the caller's array: never the cache's own
    assert (cache.hits, cache.misses) == (1, 1) and cache.bytes == one
    data_url = "data:image/png;base64," + base64.b64encode(a).decode()  # another way to send it: another key
    assert np.array_equal(cached.images([data_url])[0], expected[0][0]) and cache.misses == 2
    pv, grid = cached.images([b, a])  # b evicts the older entries; a, missed again, comes back
    assert np.array_equal(pv, np.concatenate([expected[1][0], expected[0][0]]))
    assert cache.bytes <= one and cache.misses == 4
    assert cached("Describe.", [a]).pixel_values.tobytes() == preprocessor("Describe.", [a]).pixel_values.tobytes()
    assert preprocessor.pixel_cache is None  # off unless asked (the preprocessing model asks: pixel_cache_bytes)


def test_text_only_has_no_image_tokens(preprocessor, spec):
    p = preprocessor("Hello there", [])
    assert p.num_image_tokens == 0 and p.pixel_values.shape[0] == 0
    assert (p.input_ids < spec.vocab_size).all()


def test_too_many_images(preprocessor):
    with pytest.raises(InputError, match=r"^image: 5 images given, at most 4 are allowed"):
        preprocessor("x", [image_bytes(32, 32)] * 5)


def test_prompt_longer_than_the_context(preprocessor):
    with pytest.raises(
        InputError, match=r"^text_input: the prompt is \d+ tokens \(images included\), the context limit is 2048"
    ):
        preprocessor("word " * 3000, [])


def test_prompt_may_not_smuggle_placeholders(preprocessor):
    with pytest.raises(InputError, match="^text_input: must not contain image placeholder tokens"):
        preprocessor("<|image_pad|>", [])


def test_extreme_aspect_ratio_is_an_input_error(preprocessor):
    with pytest.raises(InputError, match=r"^image\[0\]: .*aspect ratio"):
        preprocessor("x", [image_bytes(4000, 10)])


# -- requests: messages and byte bounds, checked before any work ------------------------------------------
def _arrays(**kw):
    import numpy as np

    out = {"max_tokens": np.array([[8]], np.int32)}
    for k, v in kw.items():
        out[k] = np.array([[v if isinstance(v, bytes) else v.encode()]], dtype=np.object_) if k != "image" else \
            np.array([v], dtype=np.object_)
    return out


MESSAGE_ERRORS = {
    "both inputs": (dict(text_input="x", messages="[]"), "messages: give text_input or messages, not both"),
    "neither": (dict(), "text_input: is required (or messages)"),
    "images beside messages": (dict(messages='[{"role": "user", "content": "x"}]', image=[b"x"]),
                               "image: with messages, images go in the messages' image_url parts"),
    "not JSON": (dict(messages="[{"), "messages: is not valid JSON"),
    "not an array": (dict(messages='{"role": "user"}'), "messages: must be a non-empty JSON array"),
    "empty": (dict(messages="[]"), "messages: must be a non-empty JSON array"),
    "unknown role": (dict(messages='[{"role": "tool", "content": "x"}]'),
                     "messages[0].role: 'tool' is not one of system, user, assistant (or developer)"),
    "content type": (dict(messages='[{"role": "user", "content": 3}]'),
                     "messages[0].content: must be a string or a list of parts"),
    "part type": (dict(messages='[{"role": "user", "content": [{"type": "audio"}]}]'),
                  "messages[0].content[0].type: 'audio' is not supported"),
    "image in an assistant turn": (
        dict(messages='[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "eA=="}}]}]'),
        "messages[0].content[0]: images go in user messages, not in assistant messages"),
    "remote URL": (
        dict(messages='[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a.b/c.png"}}]}]'),
        "messages[0].content[0].image_url: remote URLs are not fetched here"),
    "file URL": (
        dict(messages='[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]'),
        "messages[0].content[0].image_url: URL scheme 'file' is not supported"),
}


@pytest.mark.parametrize("case", list(MESSAGE_ERRORS))
def test_a_bad_request_names_its_input(case):
    from qwen3vl_triton.errors import InputError
    from qwen3vl_triton.text.preprocess import parse_request

    kw, message = MESSAGE_ERRORS[case]
    with pytest.raises(InputError) as err:
        parse_request(_arrays(**kw), 64)
    assert message in str(err.value)


def test_byte_bounds_come_before_parsing(monkeypatch):
    # the order is the behaviour: a request above its byte bounds is refused before any of its
    # bytes are parsed as JSON or decoded as text (watched here, not timed)
    from qwen3vl_triton.errors import InputError
    from qwen3vl_triton.text import untrusted
    from qwen3vl_triton.text.preprocess import Limits, parse_request

    calls, loads, text = [], untrusted.loads, untrusted.text
    monkeypatch.setattr(untrusted, "loads", lambda *a, **kw: calls.append("loads") or loads(*a, **kw))
    monkeypatch.setattr(untrusted, "text", lambda *a, **kw: calls.append("utf-8 decode") or text(*a, **kw))
    limits = Limits(text_bytes=100, image_bytes=1000, request_bytes=10_000)
    with pytest.raises(InputError, match=r"^request: is 20\d\d\d bytes, above the limit of 10000$"):
        parse_request(_arrays(messages="[" * 20_000), 64, limits)  # not parsed: it would fail as JSON
    assert calls == []
    with pytest.raises(InputError, match=r"^text_input: is 101 bytes, above the limit of 100$"):
        parse_request(_arrays(text_input="x" * 101), 64, limits)
    assert calls == []
    with pytest.raises(InputError, match=r"^messages: the text is 120 bytes, above the limit of 100$"):
        parse_request(_arrays(messages='[{"role": "system", "content": "%s"}, {"role": "user", "content": '
                                       '[{"type": "text", "text": "%s"}]}]' % ("a" * 60, "b" * 60)), 64, limits)
    assert calls == ["loads"]  # messages are measured once parsed, before any templating


def test_messages_render_with_the_checkpoint_template(preprocessor, spec):
    import json

    from qwen3vl_triton.text.preprocess import parse_request
    from tests.oracle import data_url, image_bytes

    img = image_bytes(64, 64, 5)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [{"type": "text", "text": "Again:"},
                                             {"type": "image_url", "image_url": {"url": data_url(img)}}]}]
    req = parse_request(_arrays(messages=json.dumps(messages)), 64)
    assert req.image_names == ["messages[1].content[0].image_url", "messages[3].content[1].image_url"]
    p = preprocessor.request(req)
    text = preprocessor.tokenizer.decode(p.input_ids[p.input_ids < spec.vocab_size])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert len(p.image_grid_thw) == 2 and p.num_image_tokens == int((p.input_ids >= spec.vocab_size).sum())


# -- the TensorRT-LLM ensemble's optional inputs (genai-perf's TensorRT-LLM mode sends them) ----------
def _options(**kw):
    out = {}
    for name, value in kw.items():
        if isinstance(value, list):
            kind = np.object_ if value and isinstance(value[0], bytes) else np.float32
            out[name] = np.array([value], dtype=kind)
        else:
            kind = {bool: np.bool_, float: np.float32, int: np.int32}[type(value)]
            out[name] = np.array([[value]], dtype=kind)
    return out


HONOURED = {
    "genai-perf": dict(exclude_input_in_output=True, min_length=8),
    "neutral values": dict(beam_width=1, num_return_sequences=1, return_log_probs=False,
                           return_context_logits=False, return_generation_logits=False, presence_penalty=0.0,
                           frequency_penalty=0.0, repetition_penalty=1.0, length_penalty=1.3, pad_id=0,
                           bad_words=[], embedding_bias_words=[], embedding_bias_weights=[]),
    "min_tokens equal to min_length": dict(min_length=3, min_tokens=3),
    "an end id of the checkpoint": dict(end_id=7),
}


@pytest.mark.parametrize("case", list(HONOURED))
def test_the_trtllm_ensembles_optional_inputs_that_ask_for_nothing_new_are_taken(case):
    from qwen3vl_triton.text.preprocess import parse_options

    options = parse_options(_options(**HONOURED[case]), max_tokens=16, end_ids=(7, 9))
    assert options.min_tokens == HONOURED[case].get("min_length", 0)


REFUSED = {
    "beam_width": (dict(beam_width=4), "beam_width: must be 1 (beam search is not implemented here"),
    "num_return_sequences": (dict(num_return_sequences=2), "num_return_sequences: must be 1"),
    "exclude_input_in_output": (dict(exclude_input_in_output=False),
                                "exclude_input_in_output: false is not supported: outputs here never include"),
    "return_log_probs": (dict(return_log_probs=True), "return_log_probs: true is not supported"),
    "return_generation_logits": (dict(return_generation_logits=True), "return_generation_logits: true is not"),
    "presence_penalty": (dict(presence_penalty=0.5), "presence_penalty: must be 0.0 (penalties are not implemented"),
    "repetition_penalty": (dict(repetition_penalty=1.2), "repetition_penalty: must be 1.0"),
    "end_id": (dict(end_id=5), "end_id: must be one of the checkpoint's end ids [7, 9]"),
    "bad_words": (dict(bad_words=[b"foo"]), "bad_words: is not implemented here"),
    "embedding_bias_weights": (dict(embedding_bias_weights=[1.0]), "embedding_bias_weights: is not implemented"),
    "min_length above max_tokens": (dict(min_length=17), "min_length: must be in [0, max_tokens = 16], got 17"),
    "disagreeing minimums": (dict(min_length=3, min_tokens=4), "min_length: min_length 3 and min_tokens 4 disagree"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_trtllm_ensembles_optional_inputs_that_ask_for_more_are_refused_by_name(case):
    from qwen3vl_triton.text.preprocess import parse_options

    kw, message = REFUSED[case]
    with pytest.raises(InputError) as err:
        parse_options(_options(**kw), max_tokens=16, end_ids=(7, 9))
    assert message in str(err.value)


def test_a_model_without_a_minimum_length_refuses_one_and_takes_zero():
    from qwen3vl_triton.text.preprocess import parse_options

    assert parse_options(_options(min_length=0), 16, min_tokens=False).min_tokens == 0
    with pytest.raises(InputError, match="min_tokens: a minimum output length is not implemented on this model"):
        parse_options(_options(min_tokens=2), 16, min_tokens=False)
    with pytest.raises(InputError, match="end_id: is not taken by this model"):
        parse_options(_options(end_id=7), 16)


def test_parse_request_carries_the_options():
    from qwen3vl_triton.text.preprocess import parse_request

    arrays = {**_arrays(text_input="Hi"), **_options(exclude_input_in_output=True, min_length=5)}
    assert parse_request(arrays, 64).options.min_tokens == 5
