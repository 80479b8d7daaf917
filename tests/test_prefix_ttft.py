"""load_tests/prefix_ttft.py's own logic, without a server: the conversation each turn sends, the
requests of both sides, the first content's time in a stream, and the summary that refuses
figures that cannot be. No assertion here is about speed."""

import base64
import json
import math

import pytest

from load_tests import prefix_ttft as pt
from load_tests.prefix_ttft import LLAMACPP, SERVED, ImpossibleFigure, Round, Turn


def _png():
    from tests.oracle import image_bytes

    return image_bytes(32, 16, 1)


def test_turn2_holds_turn1_unchanged_then_its_answer_and_the_follow_up():
    png = _png()
    t1 = pt.turn1_messages(png)
    assert len(t1) == 1 and t1[0]["role"] == "user"
    image, text = t1[0]["content"]
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == png
    assert text == {"type": "text", "text": pt.QUESTION}
    t2 = pt.turn2_messages(png, "A red square.")
    assert t2[:1] == t1  # turn 1's KV is a prefix of turn 2's
    assert t2[1] == {"role": "assistant", "content": "A red square."}
    assert t2[2] == {"role": "user", "content": [{"type": "text", "text": pt.FOLLOW_UP}]}
    assert pt.turn2_messages(png, "")[1]["content"] == ""  # an empty answer is still a turn
    with pytest.raises(TypeError, match="answer"):
        pt.turn2_messages(png, None)


def test_both_sides_ask_the_same_streamed_greedy_request_and_only_llamacpp_its_cache():
    messages = pt.turn2_messages(_png(), "x")
    served, llama = pt.served_body(messages, 16), pt.llamacpp_body(messages, 16)
    for body in (served, llama):
        assert body["messages"] == messages and body["max_tokens"] == 16
        assert body["stream"] is True and body["temperature"] == 0.0 and body["model"] == "qwen3vl"
    assert llama["cache_prompt"] is True and llama["ignore_eos"] is False
    assert not {"cache_prompt", "ignore_eos", "timings_per_token"} & served.keys()  # the OpenAI fields only
    json.dumps(served), json.dumps(llama)


def test_llama_server_keeps_a_prompt_cache_only_when_asked():
    from load_tests.bench_llamacpp import server_command

    def cache_ram(**kw):
        cmd = server_command("/b/llama-server", "/g/m.gguf", "/g/p.gguf", 40123, threads=1, **kw)
        return cmd[cmd.index("--cache-ram") + 1]

    assert cache_ram() == "0" and cache_ram(cache_ram_mib=256) == "256"
    with pytest.raises(ValueError, match="cache_ram_mib"):
        cache_ram(cache_ram_mib=-1)  # llama-server's -1 means no limit: never by accident


def test_stream_times_its_first_content_not_its_role_chunk_and_reads_llamacpps_reuse():
    from load_tests.bench_llamacpp import ChatStream

    def chunk(delta, timings=None):
        c = {"choices": [{"index": 0, "delta": delta}]}
        if timings:
            c["timings"] = timings
        return "data: " + json.dumps(c)

    s = ChatStream()
    s.feed(chunk({"role": "assistant", "content": None}), 0.05)
    s.feed(chunk({"content": ""}), 0.06)
    s.feed(chunk({"content": "Hi"}, {"prompt_n": 12, "cache_n": 250, "prompt_ms": 14.5, "predicted_n": 1}), 0.08)
    s.feed(chunk({"content": "!"}, {"prompt_n": 12, "cache_n": 250, "predicted_n": 2}), 0.09)
    s.feed("data: [DONE]", 0.09)
    assert s.first_content == 0.08 and s.cached_tokens == 250 and s.prompt_tokens == 262 and s.done
    assert s.prompt_ms == 14.5
    served = ChatStream()  # no timings: the served endpoint's chunks
    served.feed(chunk({"content": "a"}), 0.2)
    served.feed('data: {"choices": [], "usage": {"prompt_tokens": 281, "completion_tokens": 1}}', 0.21)
    assert served.first_content == 0.2 and served.prompt_tokens == 281 and served.cached_tokens == 0
    assert served.prompt_ms is None


def _round(side, t1, t2, p1=220, p2=270, reused=219):
    return Round(side, Turn(t1, p1, 0), Turn(t2, p2, reused))


def test_summary_medians_and_ratios_per_side_and_served_against_llamacpp():
    rounds = [_round(SERVED, 0.50, 0.10), _round(LLAMACPP, 0.60, 0.12),
              _round(SERVED, 0.40, 0.12), _round(LLAMACPP, 0.50, 0.10),
              _round(SERVED, 0.60, 0.14), _round(LLAMACPP, 0.70, 0.20)]
    s = pt.summarize(rounds)
    served, llama = s["sides"][SERVED], s["sides"][LLAMACPP]
    assert served["turn1_s"] == 0.50 and served["turn2_s"] == 0.12
    assert served["turn2_vs_turn1"] == pytest.approx(0.24)
    assert served["turn2_vs_turn1_rounds_p50"] == pytest.approx(0.23333, abs=1e-4)  # 0.2, 0.3, 0.2333
    assert llama["turn2_s"] == 0.12 and served["turn2_reused_p50"] == 219
    assert s["served_vs_llamacpp_turn2"] == pytest.approx(1.0)
    assert s["served_vs_llamacpp_turn2_rounds_p50"] == pytest.approx(0.10 / 0.12)  # 0.833, 1.2, 0.7
    assert s["target"]["met"] is True  # 0.24 <= 0.3 and 1.0 <= 1.0
    assert "met" in pt.format_summary(s)
    slower = pt.summarize([_round(SERVED, 0.5, 0.2), _round(LLAMACPP, 0.5, 0.1)])
    assert slower["target"]["met"] is False and slower["served_vs_llamacpp_turn2"] == pytest.approx(2.0)
    alone = pt.summarize([_round(SERVED, 0.5, 0.1)])
    assert alone["target"]["met"] is False and alone["target"]["served_vs_llamacpp_turn2"] is None  # not measured


@pytest.mark.parametrize("bad, message", [
    (_round(SERVED, 0.0, 0.1), "turn 1: time to first token 0.0"),
    (_round(SERVED, 0.5, -0.01), "turn 2: time to first token -0.01"),
    (_round(SERVED, 0.5, math.nan), "turn 2: time to first token nan"),
    (_round(SERVED, math.inf, 0.1), "turn 1: time to first token inf"),
    (_round(LLAMACPP, 0.5, 0.1, reused=271), "271 tokens reused of a 270-token prompt"),
    (_round(LLAMACPP, 0.5, 0.1, reused=-1), "-1 tokens reused"),
    (_round(SERVED, 0.5, 0.1, p2=220), "is not longer than turn 1's"),
    (_round(SERVED, 0.5, 0.1, p1=0), "0 prompt tokens"),
])
def test_summary_refuses_figures_that_cannot_be(bad, message):
    with pytest.raises(ImpossibleFigure, match=message.replace("(", r"\(")):
        pt.summarize([_round(SERVED, 0.5, 0.1), bad] if bad.side == LLAMACPP else [bad])


def test_summary_refuses_unpaired_sides():
    with pytest.raises(ImpossibleFigure, match="not paired"):
        pt.summarize([_round(SERVED, 0.5, 0.1), _round(SERVED, 0.5, 0.1), _round(LLAMACPP, 0.5, 0.1)])


def test_reuse_unknown_is_no_figure_but_no_error():
    r = Round(SERVED, Turn(0.5, 220, None), Turn(0.1, 270, None))
    s = pt.summarize([r])
    assert s["sides"][SERVED]["turn2_reused_p50"] is None
    assert "reused p50 ?" in pt.format_summary(s) and "? reused" in pt.format_round(1, r)
