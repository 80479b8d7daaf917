"""Preprocessing: prompt layout, image decoding, resize bounds, placeholder expansion, bad input."""

import base64
import struct
import zlib

import numpy as np
import pytest

from qwen3vl_triton.errors import InputError
from qwen3vl_triton.preprocess import decode_image
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
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        tokenize=False, add_generation_prompt=True)
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


def test_text_only_has_no_image_tokens(preprocessor, spec):
    p = preprocessor("Hello there", [])
    assert p.num_image_tokens == 0 and p.pixel_values.shape[0] == 0
    assert (p.input_ids < spec.vocab_size).all()


def test_too_many_images(preprocessor):
    with pytest.raises(InputError, match=r"^image: 5 images given, at most 4 are allowed"):
        preprocessor("x", [image_bytes(32, 32)] * 5)


def test_prompt_longer_than_the_context(preprocessor):
    with pytest.raises(InputError, match=r"^text_input: the prompt is \d+ tokens \(images included\), the context limit is 2048"):
        preprocessor("word " * 3000, [])


def test_prompt_may_not_smuggle_placeholders(preprocessor):
    with pytest.raises(InputError, match="^text_input: must not contain image placeholder tokens"):
        preprocessor("<|image_pad|>", [])


def test_extreme_aspect_ratio_is_an_input_error(preprocessor):
    with pytest.raises(InputError, match=r"^image\[0\]: .*aspect ratio"):
        preprocessor("x", [image_bytes(4000, 10)])
