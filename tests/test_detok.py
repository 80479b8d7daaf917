"""Incremental detokenization: pieces concatenate to the one-shot decode; split characters are held."""

import random

from qwen3vl_triton.detok import IncrementalDetokenizer


def _stream(tokenizer, ids, chunk=1):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces, detok.flush()


def test_multibyte_characters_split_across_tokens_are_held_back(preprocessor):
    tok = preprocessor.tokenizer
    text = "Caf\u00e9 \u4f60\u597d \U0001f600\U0001f431 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # the byte-level vocabulary really splits some character over several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == text
    assert not any("\ufffd" in p for p in pieces)


def test_random_token_streams_concatenate_to_decode(preprocessor, spec):
    tok = preprocessor.tokenizer
    rng = random.Random(0)
    real_vocab = len(tok)
    for trial in range(20):
        ids = [rng.randrange(real_vocab) for _ in range(rng.randrange(1, 60))]
        pieces, rest = _stream(tok, ids, chunk=rng.choice([1, 2, 3]))
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(preprocessor, spec):
    tok = preprocessor.tokenizer
    ids = tok("Hi", add_special_tokens=False)["input_ids"] + [spec.end_id, spec.pad_id]
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == "Hi"
