"""The vision encoder's outputs against transformers: table packing, DeepStack levels, M-RoPE."""

import numpy as np
import pytest
import torch

from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.table import deepstack_add_reference, deepstack_row, pack_table, stride_of
from qwen3vl_triton.model.vision import EncodeRequest
from tests.oracle import image_bytes

CASES = {
    "one image": [image_bytes(100, 150, 1)],
    "two sizes": [image_bytes(200, 64, 2), image_bytes(64, 64, 3)],
    "portrait and wide": [image_bytes(48, 256, 4), image_bytes(512, 40, 5)],
    "text only": [],
}


def _encode(preprocessor, encoder, images, prompt="Describe."):
    p = preprocessor(prompt, images)
    return p, encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]


def _captured_language_inputs(oracle, images, prompt="Describe."):
    """What transformers hands its language model: embeddings, visual mask, DeepStack levels, positions."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    lm = oracle.model.model.language_model
    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            oracle.model(**oracle.inputs(prompt, images).kwargs())
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]])
def test_table_rows_match_transformers_embeddings_and_deepstack(case, preprocessor, encoder, oracle, spec):
    images = CASES[case]
    p, r = _encode(preprocessor, encoder, images)
    seen = _captured_language_inputs(oracle, images)
    mask = seen["visual_pos_masks"][0].numpy()
    fake = p.input_ids >= spec.vocab_size
    np.testing.assert_array_equal(fake, mask)  # image tokens sit exactly where transformers puts them
    n = int(fake.sum())
    table = r.prompt_embedding_table
    s = stride_of(r.prompt_vocab_size, spec.deepstack_levels)
    assert table.shape == (4 * s, spec.hidden_size) and s >= n
    # The encoder runs the patch embedding as a matmul, transformers as a Conv3d: the same products
    # summed in another order, so the tables agree to float32 rounding, not bit for bit.
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(table[:n], seen["inputs_embeds"][0][torch.from_numpy(mask)], **close)
    for k, level in enumerate(seen["deepstack_visual_embeds"]):
        torch.testing.assert_close(table[(k + 1) * s:(k + 1) * s + n], level, **close)


@pytest.mark.parametrize("case", list(CASES))
def test_mrope_positions_and_delta_match_get_rope_index(case, preprocessor, oracle, spec):
    images = CASES[case]
    p = preprocessor("Describe.", images)
    pos, delta = mrope.position_ids(p.input_ids, p.image_grid_thw, spec)
    inp = oracle.inputs("Describe.", images)
    ref_pos, ref_delta = oracle.model.model.get_rope_index(
        inp.input_ids, inp.mm_token_type_ids, image_grid_thw=inp.image_grid_thw)
    np.testing.assert_array_equal(pos, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta[0, 0])


@pytest.mark.parametrize("case", ["two sizes", "text only"])
def test_rotary_table_matches_transformers_rotary_embedding(case, preprocessor, encoder, oracle, spec):
    images = CASES[case]
    p, r = _encode(preprocessor, encoder, images)
    pos, _ = mrope.position_ids(p.input_ids, p.image_grid_thw, spec)
    rotary = oracle.model.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = rotary(x, torch.from_numpy(pos)[:, None, :])
    cos, sin = mrope.unpack_cos_sin(r.mrope_rotary_cos_sin, spec, p.input_ids.size)
    torch.testing.assert_close(torch.cat((cos, cos), -1), ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat((sin, sin), -1), ref_sin[0], rtol=0, atol=1e-6)
    # TensorRT-LLM's layout: [P, d/2, (cos, sin)], padded rows are position 0
    padded = mrope.rotary_cos_sin(pos, spec, num_positions=p.input_ids.size + 5).reshape(-1, spec.head_dim // 2, 2)
    assert padded.shape[0] == p.input_ids.size + 5
    np.testing.assert_array_equal(padded[-1, :, 0], np.ones(spec.head_dim // 2, np.float32))
    np.testing.assert_array_equal(padded[-1, :, 1], np.zeros(spec.head_dim // 2, np.float32))


def test_batched_encode_equals_one_by_one(preprocessor, encoder):
    prompts = [preprocessor("a", CASES["one image"]), preprocessor("b", []), preprocessor("c", CASES["two sizes"])]
    reqs = [EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw) for p in prompts]
    together = encoder.encode(reqs)
    for req, got in zip(reqs, together):
        alone = encoder.encode([req])[0]
        torch.testing.assert_close(got.prompt_embedding_table, alone.prompt_embedding_table, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.mrope_rotary_cos_sin, alone.mrope_rotary_cos_sin)
        assert got.mrope_position_deltas == alone.mrope_position_deltas


def test_deepstack_indexing_reads_the_right_rows():
    vocab, hidden, n, s = 10, 4, 3, 5  # stride larger than the image token count
    e = torch.arange(n * hidden, dtype=torch.float32).reshape(n, hidden)
    levels = [100 * (k + 1) + e for k in range(3)]
    table = pack_table(e, levels, stride=s)
    ids = torch.tensor([1, vocab + 0, vocab + 2, 3, vocab + 1])
    for k in range(3):
        rows = deepstack_row(ids, vocab, s, k)
        assert rows.tolist() == [-1, (k + 1) * s, (k + 1) * s + 2, -1, (k + 1) * s + 1]
        out = deepstack_add_reference(torch.zeros(5, hidden), ids, table, vocab, s, k)
        torch.testing.assert_close(out[1], levels[k][0])
        torch.testing.assert_close(out[2], levels[k][2])
        assert out[0].abs().sum() == 0 and out[3].abs().sum() == 0
    with pytest.raises(ValueError, match="not 4 stacked blocks"):
        stride_of(10, 3)


def test_patch_linear_computes_the_convolution():
    from qwen3vl_triton.model.vision import PatchLinear

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 24, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    patches = torch.randn(7, 3, 2, 4, 4)
    with torch.no_grad():
        expected = conv(patches).reshape(7, 24)
        torch.testing.assert_close(PatchLinear(conv)(patches), expected, rtol=1e-5, atol=1e-6)


def test_image_size_inputs_are_computed_once_per_size(spec, preprocessor):
    from qwen3vl_triton.model.vision import VisionEncoder

    encoder = VisionEncoder(spec)  # its own cache
    p = preprocessor("a", CASES["one image"])
    req = EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)
    first = encoder.encode([req])[0]
    again = encoder.encode([req, req])  # the same size twice in one batch, and a second time
    assert encoder._grid.cache_info().misses == 1
    for got in again:
        torch.testing.assert_close(got.prompt_embedding_table, first.prompt_embedding_table, rtol=1e-5, atol=1e-5)
