"""Incremental detokenization: pieces concatenate to the one-shot decode; split characters are held."""

import random

from qwen3vl_triton.text.detok import IncrementalDetokenizer


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
    for _trial in range(20):
        ids = [rng.randrange(real_vocab) for _ in range(rng.randrange(1, 60))]
        pieces, rest = _stream(tok, ids, chunk=rng.choice([1, 2, 3]))
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(preprocessor, spec):
    tok = preprocessor.tokenizer
    ids = tok("Hi", add_special_tokens=False)["input_ids"] + [spec.end_id, spec.pad_id]
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == "Hi"


def test_stream_detokenizers_hold_split_characters_per_key(preprocessor, spec):
    from qwen3vl_triton.text.detok import StreamDetokenizers

    tok = preprocessor.tokenizer
    streams = StreamDetokenizers(tok, end_ids=spec.end_ids)
    a = tok("\U0001f600 smile", add_special_tokens=False)["input_ids"] + [spec.end_id]
    b = tok("\u4f60\u597d ok", add_special_tokens=False)["input_ids"] + [spec.end_id]
    out = {"a": "", "b": ""}
    for i in range(max(len(a), len(b))):  # interleaved, one token per chunk
        for key, ids in (("a", a), ("b", b)):
            if i < len(ids):
                out[key] += streams.add(key, ids[i:i + 1])
    assert out == {"a": "\U0001f600 smile", "b": "\u4f60\u597d ok"}
    assert len(streams) == 0  # ended streams hold nothing


def test_stream_state_expires_and_keyless_chunks_decode_alone(preprocessor, spec):
    from qwen3vl_triton.text.detok import StreamDetokenizers

    tok = preprocessor.tokenizer
    now = [0.0]
    streams = StreamDetokenizers(tok, end_ids=spec.end_ids, idle_seconds=10, clock=lambda: now[0])
    ids = tok("\U0001f600", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert streams.add("cut", ids[:1]) == "" and len(streams) == 1  # a split character is held
    now[0] = 11.0
    assert streams.add("other", tok("hi", add_special_tokens=False)["input_ids"]) == "hi"
    assert len(streams) == 0  # the idle one expired; complete text leaves no state
    assert streams.add(None, ids[:1]) == tok.decode(ids[:1])


def test_invalid_bytes_are_sent_at_once_and_unfinished_ones_held(preprocessor, spec):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from qwen3vl_triton.text.detok import StreamDetokenizers

    tok = preprocessor.tokenizer
    byte_token = {b: tok.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
    streams = StreamDetokenizers(tok, end_ids=spec.end_ids)
    # a lone continuation byte can never become a character: U+FFFD now, no state kept
    assert streams.add("k", [byte_token[0x85]]) == "\ufffd" and len(streams) == 0
    # a lead byte may still complete: held
    assert streams.add("k", [byte_token[0xE4]]) == "" and len(streams) == 1
    # ...and completes: the two continuation bytes of U+4F60
    assert streams.add("k", [byte_token[0xBD], byte_token[0xA0]]) == "\u4f60" and len(streams) == 0
    # a lead byte followed by ASCII shows it was invalid: both come out
    assert streams.add("k", [byte_token[0xE4], tok.convert_tokens_to_ids("a")]) == tok.decode(
        [byte_token[0xE4], tok.convert_tokens_to_ids("a")])


def test_a_special_token_between_the_bytes_of_a_character_does_not_cut_it(tiny_checkpoint):
    """decode(skip_special_tokens=True) joins the bytes on both sides of a skipped special token."""
    from transformers import AutoTokenizer

    from qwen3vl_triton.text.detok import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    raw = "畯".encode()  # three bytes: the first two in one token, the last after a special token
    lead, last = tok.convert_tokens_to_ids(_byte_tokens(raw[:1])), tok.convert_tokens_to_ids(_byte_tokens(raw[1:2]))
    tail = tok.convert_tokens_to_ids(_byte_tokens(raw[2:]))
    # an added special token that decode skips, though it is not one of the named special tokens
    special = next(i for i, t in tok.added_tokens_decoder.items() if t.special and i not in tok.all_special_ids)
    ids = [*lead, *last, special, *tail]
    d = IncrementalDetokenizer(tok)
    text = "".join(d.add([i]) for i in ids) + d.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "畯"


def _byte_tokens(raw: bytes) -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return ["".join(table[b] for b in raw)]


def test_stop_strings_are_matched_across_pieces_and_cut_before():
    from qwen3vl_triton.text.detok import StopMatcher

    m = StopMatcher(["STOP", "xyz"])
    sent = []
    for piece in ["he", "llo S", "TO", "P more"]:
        text, hit = m.feed(piece)
        sent.append(text)
        if hit:
            break
    assert "".join(sent) == "hello " and hit
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False)  # "a" may begin "ab": held
    assert m.feed("c", final=True) == ("ac", False)


def test_text_stream_ends_at_an_end_id_a_stop_string_or_max_tokens(tiny_checkpoint):
    from transformers import AutoTokenizer

    from qwen3vl_triton.text.detok import TextStream

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    ids = tok("the picture shows a house", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    s = TextStream(tok, [end], max_tokens=100)
    pieces = [s.add([i]) for i in ids + [end, ids[0]]]
    assert "".join(t for t, _ in pieces) == "the picture shows a house" and s.finish == "stop"
    assert s.ids == ids + [end]
    s = TextStream(tok, [end], max_tokens=3)
    assert [f for _, f in (s.add([i]) for i in ids[:3])] == [None, None, "length"]
    s = TextStream(tok, [end], max_tokens=100, stops=[" shows"])
    text = "".join(s.add([i])[0] for i in ids)
    assert text == "the picture" and s.finish == "stop" and s.stopped_by_string
