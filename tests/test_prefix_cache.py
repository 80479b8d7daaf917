"""Prefix KV reuse (engine.prefix) on both CPU runners: a conversation reuses its earlier turns'
KV and still equals transformers' `generate`; images that differ, move or come without their ids
are never reused wrongly; eviction under a tiny budget changes no output.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_triton.engine import Engine, Request
from qwen3vl_triton.engine.prefix import BLOCK
from qwen3vl_triton.model.vision import EncodeRequest
from tests.oracle import image_bytes

MAX_NEW = 10
IMAGE_A, IMAGE_B, IMAGE_C = image_bytes(256, 128, 1), image_bytes(256, 128, 2), image_bytes(128, 192, 3)


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


class Chat:
    """Requests for conversations through the package's preprocessing and vision encoder."""

    def __init__(self, spec, preprocessor, encoder, oracle):
        self.spec, self.pre, self.enc, self.oracle = spec, preprocessor, encoder, oracle

    def request(self, conversation, images, **kw) -> Request:
        p = self.pre.render(conversation, images)
        r = self.enc.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        fields = dict(table=r.prompt_embedding_table, mrope_cos_sin=r.mrope_rotary_cos_sin,
                      mrope_delta=r.mrope_position_deltas, extra_ids=r.prompt_table_extra_ids)
        fields.update(kw)
        return Request(p.input_ids, MAX_NEW, end_id=self.spec.end_id, stop_ids=self.spec.end_ids, **fields)

    def expected(self, conversation, images) -> list[int]:
        return self.oracle._generate(self.oracle.conversation_inputs(conversation, images), MAX_NEW)

    def run(self, engine, conversation, images, **kw) -> tuple[list[int], int, int]:
        """Generated ids (checked against the oracle), prompt tokens reused, prompt length."""
        req = self.request(conversation, images, **kw)
        hits = engine.prefix.stats.hit_tokens if engine.prefix is not None else 0
        out, _ = engine.generate(req, timeout=300)
        assert out == self.expected(conversation, images)
        reused = (engine.prefix.stats.hit_tokens - hits) if engine.prefix is not None else 0
        return out, reused, int(np.asarray(req.input_ids).size)

    def reply(self, ids) -> dict:
        ids = [i for i in ids if i not in self.spec.end_ids]
        return {"role": "assistant", "content": [{"type": "text", "text": self.oracle.text(ids)}]}


@pytest.fixture(scope="module")
def chat(spec, preprocessor, oracle):
    """With the vision encoder's cache, as served: an image's rows are the same bits in every request
    (an image encoded beside others may differ in the last bits, and then its KV is not reused)."""
    from qwen3vl_triton.model.vision import VisionEncoder

    return Chat(spec, preprocessor, VisionEncoder(spec, cache_bytes=64 * 2**20), oracle)


def first_image_token(req_ids, spec) -> int:
    return int(np.flatnonzero(np.asarray(req_ids) >= spec.vocab_size)[0])


def make_engine(spec, runner, kv_cache_bytes):
    return Engine(spec, max_batch=4, max_seq_len=2048, max_output_len=64, runner=runner,
                  kv_cache_bytes=kv_cache_bytes)


@pytest.fixture(scope="module")
def cached(spec, runner):
    eng = make_engine(spec, runner, 256 * 2**20)
    assert eng.prefix is not None, eng.prefix_note
    yield eng
    eng.shutdown()


def test_a_three_turn_conversation_reuses_its_turns_and_equals_the_oracle(spec, runner, chat, cached):
    plain = make_engine(spec, runner, 0)
    try:
        assert plain.prefix is None
        conversation, images = [user("What is in the picture?", 1)], [IMAGE_A]
        reused = []
        for turn in range(3):
            out, hit, length = chat.run(cached, conversation, images)
            assert chat.run(plain, conversation, images)[0] == out  # the cache never changes an output
            reused.append((hit, length))
            conversation = conversation + [chat.reply(out)]
            if turn == 0:
                conversation.append(user("And its colour?"))
            else:
                conversation.append(user("Compare it with this one.", 1))
                images = images + [IMAGE_B]
        first_len = reused[0][1]
        assert reused[0][0] == 0
        # turns 2 and 3 start from the turn before: all of turn 1's prompt but its last block at least
        assert reused[1][0] >= first_len - 2 * BLOCK, reused
        assert reused[2][0] >= reused[1][1] - 2 * BLOCK, reused
        assert cached.prefix.stats.entries >= 1 and cached.prefix.stats.bytes > 0
    finally:
        plain.shutdown()


def test_no_wrong_reuse_across_images_texts_and_positions(spec, chat, cached):
    text = "Describe the picture in detail, please, with all the colours you see."
    # same text, different image: reuse stops before the image
    base = [user(text, 1)]
    chat.run(cached, base, [IMAGE_A])
    _, hit, _ = chat.run(cached, base, [IMAGE_B])
    assert hit <= first_image_token(chat.request(base, [IMAGE_B]).input_ids, spec)
    # same image, different text after it: the image is reused, the text is not
    other = [user("Now something else entirely about the picture?", 1)]
    _, hit, length = chat.run(cached, other, [IMAGE_A])
    assert first_image_token(chat.request(other, [IMAGE_A]).input_ids, spec) < hit < length
    # the same image at another position (after some text): its rows sit at other positions
    moved = [{"role": "system", "content": [{"type": "text", "text": "You look closely at pictures."}]},
             user(text, 1)]
    _, hit, _ = chat.run(cached, moved, [IMAGE_A])
    assert hit <= first_image_token(chat.request(moved, [IMAGE_A]).input_ids, spec)


def test_image_rows_without_ids_or_with_another_images_ids_are_never_reused(spec, chat, cached):
    conv = [user("Which animal is it?", 1)]
    chat.run(cached, conv, [IMAGE_C])
    # without prompt_table_extra_ids (or with 0 for an image row): no reuse at all (fail closed)
    assert chat.run(cached, conv, [IMAGE_C], extra_ids=None)[1] == 0
    zeroed = chat.request(conv, [IMAGE_C]).extra_ids.copy()
    zeroed[np.flatnonzero(zeroed)[3]] = 0
    assert chat.run(cached, conv, [IMAGE_C], extra_ids=zeroed)[1] == 0
    # image B's rows under image C's ids (a producer that lies): the rows differ, so no reuse past them
    ids_c = chat.request(conv, [IMAGE_C]).extra_ids
    lying = chat.request(conv, [IMAGE_B])
    if lying.extra_ids.size == ids_c.size:
        _, hit, _ = chat.run(cached, conv, [IMAGE_B], extra_ids=ids_c)
        assert hit <= first_image_token(lying.input_ids, spec)


def test_eviction_under_a_tiny_budget_never_fails_or_changes_a_request(spec, runner, chat):
    probe = make_engine(spec, runner, 1)  # holds nothing: tells the cost of one entry
    if runner == "ggml":
        budget = probe.runner.cache.stream_bytes  # one llama.cpp sequence
    else:
        budget = 100 * probe.prefix.store.token_bytes  # one short conversation at a time
    probe.shutdown()
    eng = make_engine(spec, runner, budget)
    try:
        assert eng.prefix is not None, eng.prefix_note
        convs = [([user(f"Question number {k} about the picture?", 1)], [img])
                 for k, img in enumerate([IMAGE_A, IMAGE_B, IMAGE_C, IMAGE_A])]
        for conv, images in convs + convs[::-1]:
            chat.run(eng, conv, images)
            assert eng.prefix.stats.bytes <= budget
        assert eng.prefix.stats.evictions > 0
    finally:
        eng.shutdown()


def test_a_budget_that_holds_nothing_turns_reuse_off_with_the_reason(spec, runner):
    eng = make_engine(spec, runner, 1)
    try:
        if runner == "ggml":
            assert eng.prefix is None and "kv_cache_bytes 1" in eng.prefix_note
        else:  # the torch runner keeps exact rows: an entry never fits, requests still run
            assert eng.prefix is not None
    finally:
        eng.shutdown()
