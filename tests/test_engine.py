"""The CPU engine against the oracle: greedy equality, logits, batching, sampling, streaming, errors.

Every engine behaviour runs on both CPU runners (the `runner` fixture: ggml, llama.cpp's kernels,
and torch, the reference); the tests of the torch model's own parts (LanguageModel, KVCache) run
once. The ggml runner's own checks (teacher-forced margins, positions, weights) are in
test_ggml_runner.py.
"""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from qwen3vl_triton.engine.engine import Engine
from qwen3vl_triton.errors import InputError, Unavailable
from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.lm import LanguageModel, StepSeq
from qwen3vl_triton.model.sampling import SamplingParams
from qwen3vl_triton.model.vision import EncodeRequest
from qwen3vl_triton.text.detok import IncrementalDetokenizer
from tests.oracle import image_bytes

CASES = [
    ("one image", "Describe this image in short.", [image_bytes(100, 150, 1)]),
    ("two images of different sizes", "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3)]),
    ("text only", "Tell me about the ocean.", []),
    ("portrait and very wide", "Which is brighter?", [image_bytes(48, 256, 4), image_bytes(640, 40, 5)]),
]


@pytest.fixture(scope="module")
def engine(runner, spec):
    """The engine of this module's behaviour tests, on each runner in turn."""
    eng = Engine(spec, max_batch=8, max_seq_len=2048, max_output_len=256, runner=runner)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("name, prompt, images", CASES, ids=[c[0] for c in CASES])
def test_greedy_equals_transformers_generate(name, prompt, images, engine, pipeline, oracle):
    ids, finish = engine.generate(pipeline(prompt, images, max_new_tokens=24), timeout=120)
    expected = oracle.generate(prompt, images, 24)
    assert ids == expected
    assert finish == ("stop" if expected[-1] in oracle.end_ids else "length")


def test_generation_stops_at_the_end_of_turn_token(engine, pipeline, oracle):
    stopped = 0
    for i in range(12):
        prompt = f"Prompt {i} about things"
        expected = oracle.generate(prompt, [], 60)
        ids, finish = engine.generate(pipeline(prompt, [], max_new_tokens=60), timeout=60)
        assert ids == expected
        if expected[-1] in oracle.end_ids:
            assert finish == "stop" and len(ids) < 60
            stopped += 1
    assert 0 < stopped < 12  # both ways of ending occur


def test_concurrent_requests_are_batched_and_each_equals_its_oracle(engine, pipeline, oracle):
    jobs = [(f"Request number {i}: what do you see?", [image_bytes(64 + 32 * i, 96, 10 + i)] * (i % 3), 8 + 4 * i)
            for i in range(6)]
    before = engine.stats.batched_steps
    results = [None] * len(jobs)

    requests = [pipeline(prompt, images, max_new_tokens=n) for prompt, images, n in jobs]  # all ready at once

    def run(i):
        results[i] = engine.generate(requests[i], timeout=180)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (prompt, images, n), got in zip(jobs, results):
        assert got == oracle.generate(prompt, images, n)
    assert engine.stats.batched_steps > before


def test_a_new_request_joins_a_running_batch(engine, pipeline, oracle):
    # The short request is prepared first and submitted from the long one's first token, so
    # it arrives while the long one decodes however fast this machine is.
    short_image = image_bytes(64, 64, 7)
    short_req = pipeline("Short one.", [short_image], max_new_tokens=5)
    short_ids, short_done = [], threading.Event()
    long_ids, long_done = [], threading.Event()

    def on_short(tokens, finish, error):
        short_ids.extend(tokens)
        if finish:
            short_done.set()

    def on_long(tokens, finish, error):
        if not long_ids:
            engine.submit(short_req)
        long_ids.extend(tokens)
        if finish:
            long_done.set()

    short_req.on_tokens = on_short
    long_req = pipeline("Tell me a long story.", [], max_new_tokens=120)
    long_req.on_tokens = on_long
    expected_long = oracle.generate("Tell me a long story.", [], 120)
    assert len(expected_long) > 2  # the long one is still decoding when the short one arrives
    mixed_before = engine.stats.mixed_steps
    engine.submit(long_req)
    assert long_done.wait(120) and short_done.wait(60)
    assert engine.stats.mixed_steps > mixed_before  # the short prompt was prefilled beside decoding
    assert short_ids == oracle.generate("Short one.", [short_image], 5)
    assert long_ids == expected_long


def test_prefill_logits_match_transformers(spec, assert_prefill_matches):
    assert_prefill_matches(LanguageModel(spec, slots=1, max_len=512))


def test_chunked_prefill_equals_one_shot(spec, runner, pipeline, oracle):
    # chunks of 7 cut through the images: a chunk holds text, then image rows, then text
    small_steps = Engine(spec, max_batch=2, max_seq_len=1024, max_num_tokens=7, runner=runner)
    try:
        prompt, images = CASES[1][1], CASES[1][2]
        ids, _ = small_steps.generate(pipeline(prompt, images, max_new_tokens=12), timeout=120)
        assert ids == oracle.generate(prompt, images, 12)
    finally:
        small_steps.shutdown()


def test_seeded_sampling_is_reproducible(engine, pipeline):
    def run(seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, **kw)
        return engine.generate(pipeline("Tell me a story.", [], max_new_tokens=20, sampling=params), timeout=60)[0]

    assert run(7) == run(7)
    assert run(7, top_k=5, top_p=0.9) == run(7, top_k=5, top_p=0.9)
    assert len({tuple(run(s)) for s in (1, 2, 3)}) > 1


def test_top_k_one_is_greedy(engine, pipeline, oracle):
    params = SamplingParams(temperature=0.7, top_k=1, seed=3)
    ids, _ = engine.generate(pipeline("Hello.", [], max_new_tokens=10, sampling=params), timeout=60)
    assert ids == oracle.generate("Hello.", [], 10)


def test_streamed_text_concatenates_to_the_one_shot_decode(engine, pipeline, preprocessor):
    detok = IncrementalDetokenizer(preprocessor.tokenizer)
    pieces, ids, done = [], [], threading.Event()

    def on_tokens(tokens, finish, error):
        ids.extend(tokens)
        pieces.append(detok.add(tokens))
        if finish:
            pieces.append(detok.flush())
            done.set()

    req = pipeline("Say something.", [image_bytes(80, 80, 11)], max_new_tokens=40,
                   sampling=SamplingParams(temperature=1.5, seed=5))
    req.end_id, req.stop_ids = None, ()  # run all 40 tokens
    req.on_tokens = on_tokens
    engine.submit(req)
    assert done.wait(60)
    assert "".join(pieces) == preprocessor.tokenizer.decode(ids, skip_special_tokens=True)
    assert len([p for p in pieces if p]) > 1  # it really streamed


def test_cancel_frees_the_place(engine, pipeline):
    finished = {}
    done = threading.Event()

    def on_tokens(tokens, finish, error):
        if finish:
            finished["reason"] = finish
            done.set()

    req = pipeline("Go on forever.", [], max_new_tokens=200)
    req.on_tokens = on_tokens
    rid = engine.submit(req)
    engine.cancel(rid)
    assert done.wait(30) and finished["reason"] == "cancelled"
    assert engine.load() == 0


def test_cancel_mid_run_frees_the_place(engine, pipeline, oracle):
    got, done, finished = [], threading.Event(), {}
    req = pipeline("Go on forever.", [], max_new_tokens=200)
    req.end_id, req.stop_ids = None, ()

    def on_tokens(tokens, finish, error):
        got.extend(tokens)
        if len(got) >= 5 and "cancel" not in finished:
            finished["cancel"] = True
            engine.cancel(req.request_id)
        if finish:
            finished["reason"] = finish
            done.set()

    req.on_tokens = on_tokens
    engine.submit(req)
    assert done.wait(60) and finished["reason"] == "cancelled"
    assert 5 <= len(got) < 200
    assert engine.load() == 0
    after, _ = engine.generate(pipeline("Hello.", [], max_new_tokens=10), timeout=60)
    assert after == oracle.generate("Hello.", [], 10)


@pytest.mark.parametrize("change, name, message", [
    (dict(input_ids=np.array([], np.int32)), "input_ids", "is empty"),
    (dict(input_ids=np.array([1.5, 2.0])), "input_ids", "must be integer token ids"),
    (dict(max_new_tokens=0), "request_output_len", "must be in [1, 256]"),
    (dict(max_new_tokens=10_000), "request_output_len", "must be in [1, 256]"),
    (dict(table=torch.zeros(4, 7)), "prompt_embedding_table", "must be [rows, 64]"),
    (dict(table=torch.zeros(5, 64)), "prompt_embedding_table", "not 4 stacked blocks"),
    (dict(table=torch.zeros(4, 64, dtype=torch.int32)), "prompt_embedding_table", "must be a floating-point"),
    (dict(input_ids=np.array([1, 2, 10_000], np.int32)), "input_ids", "neither a vocabulary id"),
    (dict(mrope_cos_sin=np.zeros(5, np.float32)), "mrope_rotary_cos_sin", "must hold at least"),
    (dict(end_id=-1), "end_id", "must be a vocabulary id"),
    (dict(input_ids=np.arange(3000) % 100), "input_ids", "the context limit is 2048"),
    (dict(table=torch.full((4, 64), float("nan"))), "prompt_embedding_table", "holds NaN or infinite values"),
    (dict(table=torch.full((4, 64), float("-inf"))), "prompt_embedding_table", "holds NaN or infinite values"),
    (dict(mrope_cos_sin=np.full(16 * 64, np.nan, np.float32)), "mrope_rotary_cos_sin", "finite values in [-1, 1]"),
    (dict(mrope_cos_sin=np.full(16 * 64, 2.0, np.float32)), "mrope_rotary_cos_sin", "finite values in [-1, 1]"),
    (dict(mrope_delta=2**63 - 1), "mrope_position_deltas", "got 9223372036854775807"),
    (dict(mrope_delta=-10**6), "mrope_position_deltas", "must be in ["),
])
def test_bad_contract_inputs_name_the_input(change, name, message, engine, pipeline):
    req = pipeline("Hi.", [], max_new_tokens=4)
    for key, value in change.items():
        setattr(req, key, value)
    with pytest.raises(InputError) as err:
        engine.submit(req)
    assert err.value.input == name and message in str(err.value)
    assert engine.generate(pipeline("Still serving?", [], max_new_tokens=3), timeout=30)[1] in ("stop", "length")


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"),
])
def test_bad_sampling_parameters(kw, name):
    with pytest.raises(InputError) as err:
        SamplingParams(**kw)
    assert err.value.input == name


def test_cancelling_a_finished_request_leaves_nothing_behind(engine, pipeline):
    rid = engine.submit(pipeline("Short.", [], max_new_tokens=2))
    for _ in range(200):
        if engine.load() == 0:
            break
        time.sleep(0.05)
    engine.cancel(rid)  # too late: it already finished
    engine.generate(pipeline("Next.", [], max_new_tokens=2), timeout=30)
    assert rid not in engine.scheduler._cancel


def test_the_engine_steps_on_while_a_consumer_is_slow(engine, pipeline, oracle):
    # In the server a callback hands a response to Triton and waits for it: the engine thread
    # must not wait with it. Here the first callback blocks until the engine has stepped on.
    release, ids, done = threading.Event(), [], threading.Event()

    def on_tokens(tokens, finish, error):
        release.wait(60)
        ids.extend(tokens)
        if finish:
            done.set()

    req = pipeline("Write a long story.", [], max_new_tokens=40)
    req.on_tokens = on_tokens
    steps = engine.stats.steps
    engine.submit(req)
    deadline = time.monotonic() + 60
    while engine.stats.steps < steps + 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    stepped = engine.stats.steps - steps
    release.set()
    assert done.wait(60)
    assert stepped >= 10  # ten steps went by while the first token's callback was still blocked
    assert ids == oracle.generate("Write a long story.", [], 40)  # nothing lost or reordered


def test_the_kv_cache_starts_zeroed_whatever_the_memory_held(spec):
    # Batched decode attends over every slot up to the longest sequence and masks the rest, but a
    # masked position still multiplies its V row by 0: a NaN left in memory no sequence wrote
    # turns that sequence's output into NaN (it did: token 0 under batching, in CI). The cache
    # must not inherit what the allocator's memory held before.
    from qwen3vl_triton.model.lm import KVCache

    slots, max_len = 2, 16
    numel = slots * spec.num_kv_heads * max_len * spec.head_dim
    for _ in range(3):
        dirty = [torch.full((numel,), float("nan")) for _ in range(4 * spec.num_layers)]
        del dirty  # freed: the next allocations of this size get these blocks back
        cache = KVCache(spec, slots, max_len, torch.float32)
        for t in (*cache.k, *cache.v):
            assert t.shape == (slots, spec.num_kv_heads, max_len, spec.head_dim)
            assert not t.isnan().any() and t.abs().sum() == 0


def test_decode_steps_match_transformers_alone_and_batched(spec, preprocessor, encoder, oracle):
    # Teacher-forced: each prompt is prefilled, then fixed tokens are decoded one step at a time,
    # once with every sequence alone (a handful of (token, expert) pairs: the row kernel) and
    # once all five together (more pairs than experts: the grouped kernel); the logits of every
    # decode position against transformers' forward over prompt + those tokens.
    prompts = [("Two pictures.", [image_bytes(120, 80, 8), image_bytes(64, 200, 9)]), ("Text only.", []),
               ("One picture.", [image_bytes(96, 96, 10)]), ("Another text, longer than the first one.", []),
               ("Wide.", [image_bytes(256, 48, 11)])]
    steps = 5
    rng = np.random.default_rng(0)
    forced = rng.integers(0, min(spec.vision_start_token_id, spec.end_id, spec.pad_id), (len(prompts), steps))
    reference, inputs = [], []
    for (prompt, images), tokens in zip(prompts, forced):
        inp = oracle.inputs(prompt, images)
        kw = inp.kwargs()
        kw["input_ids"] = torch.cat([inp.input_ids, torch.from_numpy(tokens)[None]], dim=1)
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        kw["mm_token_type_ids"] = torch.cat([inp.mm_token_type_ids, torch.zeros((1, steps), dtype=torch.int32)], 1)
        with torch.inference_mode():
            reference.append(oracle.model(**kw).logits[0, -steps:])
        p = preprocessor(prompt, images)
        r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        cos, sin = mrope.unpack_cos_sin(r.mrope_rotary_cos_sin, spec, p.input_ids.size)
        inputs.append((torch.from_numpy(p.input_ids.astype(np.int64)), cos, sin, r))

    def decode(lm, members):
        for slot, i in enumerate(members):
            ids, cos, sin, r = inputs[i]
            lm.forward([StepSeq(slot, ids, 0, cos, sin, r.prompt_embedding_table)])
        got = {i: [] for i in members}
        for j in range(steps):
            batch = [StepSeq(slot, torch.tensor([int(forced[i, j])]), inputs[i][0].numel() + j,
                             table=inputs[i][3].prompt_embedding_table, delta=inputs[i][3].mrope_position_deltas)
                     for slot, i in enumerate(members)]
            for i, logits in zip(members, lm.forward(batch)):
                got[i].append(logits[0])
        return {i: torch.stack(v) for i, v in got.items()}

    together = decode(LanguageModel(spec, slots=len(prompts), max_len=512), list(range(len(prompts))))
    for i in range(len(prompts)):
        alone = decode(LanguageModel(spec, slots=1, max_len=512), [i])[i]
        for ours in (alone, together[i]):
            diff = (ours - reference[i]).abs().max().item()
            assert diff <= 1e-4, f"{prompts[i][0]!r}: max |logit diff| {diff:.2e}"


def run_together(engine, requests, timeout=120):
    """Submit all requests at once; return per request (ids, finish, error)."""
    results = [None] * len(requests)
    done = [threading.Event() for _ in requests]
    for i, req in enumerate(requests):
        ids = []

        def on_tokens(tokens, finish, error, i=i, ids=ids):
            ids.extend(tokens)
            if finish is not None:
                results[i] = (ids, finish, error)
                done[i].set()

        req.on_tokens = on_tokens
    for req in requests:
        engine.submit(req)
    assert all(d.wait(timeout) for d in done)
    return results


def test_nothing_left_in_a_kv_cache_slot_reaches_the_next_sequence(spec, pipeline, oracle):
    # Every row of every slot holds NaN, as a sequence whose numbers overflowed leaves its rows.
    # Two unrelated sequences then decode side by side, the short one's slot read by batched
    # attention past its own length: each must equal its solo run.
    engine = Engine(spec, max_batch=2, max_seq_len=512, max_output_len=64)
    try:
        for t in (*engine.lm.cache.k, *engine.lm.cache.v):
            t.fill_(float("nan"))
        jobs = [("Hi.", [], 20), ("Describe this image in detail.", [image_bytes(96, 64, 12)], 20)]
        results = run_together(engine, [pipeline(p, im, max_new_tokens=n) for p, im, n in jobs])
        for (prompt, images, n), (ids, _finish, error) in zip(jobs, results):
            assert error is None and ids == oracle.generate(prompt, images, n)
        assert engine.stats.batched_steps > 0
    finally:
        engine.shutdown()


# how each runner refuses a table whose numbers overflow inside the model: torch runs it and finds
# its logits non-finite; ggml refuses values that could overflow before they reach its KV cells
OVERFLOW_ERROR = {"torch": "the model's logits for this request are not finite",
                  "ggml": "prompt_embedding_table: values beyond"}


def test_a_request_whose_numbers_overflow_fails_alone_and_leaves_nothing_behind(spec, runner, pipeline, oracle):
    # A finite prompt table passes admission, but values near float32's limit overflow inside
    # the model (NaN in its cache rows and logits): that request fails with a clear error, the
    # one decoding beside it is untouched, and so are two later ones reusing its slot.
    engine = Engine(spec, max_batch=2, max_seq_len=512, max_output_len=64, runner=runner)
    try:
        hostile = pipeline("Look.", [image_bytes(64, 64, 13)], max_new_tokens=20)
        hostile.table = torch.full_like(hostile.table, 3e38)
        good = ("Tell me about the ocean.", [], 24)
        results = run_together(engine, [hostile, pipeline(good[0], good[1], max_new_tokens=good[2])])
        assert results[0][1] == "error" and OVERFLOW_ERROR[runner] in results[0][2]
        assert results[1][1] != "error" and results[1][0] == oracle.generate(*good)
        jobs = [("Hi.", [], 20), ("Describe this image in detail.", [image_bytes(96, 64, 12)], 20)]
        results = run_together(engine, [pipeline(p, im, max_new_tokens=n) for p, im, n in jobs])
        for (prompt, images, n), (ids, _finish, error) in zip(jobs, results):
            assert error is None and ids == oracle.generate(prompt, images, n)
    finally:
        engine.shutdown()


def test_a_vanishing_temperature_is_greedy_and_fails_nobody(engine, pipeline, oracle):
    # temperature 1e-45 overflows logits / temperature to inf; the sampler must not turn that
    # into NaN probabilities (which raised and failed every stream decoding beside it).
    jobs = [(f"Stream {i} runs along.", [], 30) for i in range(3)]
    requests = [pipeline(p, im, max_new_tokens=n) for p, im, n in jobs]
    requests.append(pipeline("Tiny temperature.", [], max_new_tokens=30,
                             sampling=SamplingParams(temperature=1e-45, seed=1)))
    results = run_together(engine, requests)
    for (prompt, images, n), (ids, _finish, error) in zip(jobs, results):
        assert error is None and ids == oracle.generate(prompt, images, n)
    assert results[3][2] is None and results[3][0] == oracle.generate("Tiny temperature.", [], 30)


def inject_fault(engine, bad, when: str) -> None:
    """Make the model's forward raise whenever it computes `bad`'s tokens -- its prompt, or (when
    "decode") only its decoded tokens -- however the runner batches them: a fault that only this
    request's data triggers, inside the step."""
    if engine.runner_name == "torch":
        forward = engine.lm.forward

        def failing_forward(batch):
            if any(s.table is bad.table and (when == "prefill" or s.cos is None) for s in batch):
                raise RuntimeError("injected fault")
            return forward(batch)

        engine.lm.forward = failing_forward
        return
    # ggml: a call of llama_decode holding a token of bad's llama sequence fails (before it runs)
    runner, decode = engine.runner, engine.runner.llama.decode
    segments, decode_segment, bad_ids = runner.segments, runner.decode_segment, set()

    def tagged(seq, n, seq_id=None, outputs=None):
        if seq.req is bad and when == "prefill":
            bad_ids.add(runner.cache.seq_id(seq.slot))
        return segments(seq, n, seq_id, outputs)

    def tagged_decodes(seqs):
        bad_ids.update(runner.cache.seq_id(seq.slot) for seq in seqs if seq.req is bad and when == "decode")
        return decode_segment(seqs)

    def failing_decode(segs):
        if any(bad_ids & set(s.seq.tolist()) for s in segs):
            raise RuntimeError("injected fault")
        return decode(segs)

    runner.segments, runner.decode_segment, runner.llama.decode = tagged, tagged_decodes, failing_decode


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_step_fault_fails_only_the_sequence_at_fault(when, spec, runner, pipeline, oracle):
    # in its prompt's step, or, once it decodes, in the step of every decoding sequence (then each
    # runs again alone)
    engine = Engine(spec, max_batch=4, max_seq_len=512, max_output_len=64, runner=runner)
    try:
        bad = pipeline("Faulty.", [image_bytes(64, 64, 14)], max_new_tokens=20)
        inject_fault(engine, bad, when)
        jobs = [(f"Good {i}.", [image_bytes(64, 48, 15 + i)] * (i % 2), 20) for i in range(2)]
        results = run_together(engine, [pipeline(p, im, max_new_tokens=n) for p, im, n in jobs] + [bad])
        for (prompt, images, n), (ids, _finish, error) in zip(jobs, results):
            assert error is None and ids == oracle.generate(prompt, images, n)
        assert results[2][1] == "error" and "injected fault" in results[2][2]
        assert len(results[2][0]) == (0 if when == "prefill" else 1)  # the prompt's token, then the fault
        assert engine.stats.batched_steps > 0
    finally:
        engine.shutdown()


def test_a_full_queue_refuses_with_unavailable(spec, runner, pipeline, oracle):
    engine = Engine(spec, max_batch=1, max_seq_len=512, max_output_len=64, max_queue=2, runner=runner)
    release = threading.Event()
    run = engine.runner.run

    def held_run(plan):  # the engine thread waits inside its first step: nothing is admitted
        release.wait(60)
        return run(plan)

    engine.runner.run = held_run
    try:
        done = []
        requests = [pipeline(f"Queued {i}.", [], max_new_tokens=3) for i in range(4)]
        for req in requests:
            req.on_tokens = lambda tokens, finish, error: finish and done.append(finish)
        engine.submit(requests[0])  # runs (held)
        deadline = time.monotonic() + 30
        while engine.scheduler.load() and not engine.scheduler._active and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(requests[1])
        engine.submit(requests[2])  # two waiting: the bound
        with pytest.raises(
            Unavailable,
            match=r"engine queue full: the 2 places for requests waiting to join the running batch are taken",
        ):
            engine.submit(requests[3])
        release.set()
        deadline = time.monotonic() + 30
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(done) == 3 and "error" not in done
        ids, _ = engine.generate(pipeline("After.", [], max_new_tokens=5), timeout=30)
        assert ids == oracle.generate("After.", [], 5)
    finally:
        release.set()
        engine.shutdown()


def test_generation_stops_at_any_end_id_of_the_checkpoint(spec, runner, pipeline, oracle):
    # generation_config.json may list several end ids; the fifth token of a known generation
    # is declared one of them, and generation must stop right there.
    prompt = "Tell me a story."
    expected = oracle.generate(prompt, [], 30)
    assert len(expected) > 5 and expected[4] not in expected[:4]
    engine = Engine(dataclasses.replace(spec, end_ids=(*spec.end_ids, expected[4])), max_batch=2,
                    max_seq_len=512, max_output_len=64, runner=runner)
    try:
        ids, finish = engine.generate(pipeline(prompt, [], max_new_tokens=30), timeout=60)
        assert ids == expected[:5] and finish == "stop"
    finally:
        engine.shutdown()


def test_min_tokens_holds_back_every_end_id_as_transformers_min_new_tokens(engine, pipeline, oracle):
    prompt = "Prompt 6 about things"
    natural = oracle.generate(prompt, [], 40)
    assert natural[-1] in oracle.end_ids and len(natural) < 12  # it ends early on its own
    expected = oracle.generate(prompt, [], 40, min_new_tokens=12)
    assert len(expected) >= 12 and expected[:len(natural) - 1] == natural[:-1]
    ids, _ = engine.generate(pipeline(prompt, [], max_new_tokens=40, min_tokens=12), timeout=120)
    assert ids == expected
    with pytest.raises(InputError, match=r"min_tokens: must be in \[0, request_output_len = 40\], got 41"):
        engine.submit(pipeline(prompt, [], max_new_tokens=40, min_tokens=41))


def test_close_ends_running_and_waiting_requests_with_its_reason_and_refuses_new_ones(spec, pipeline):
    eng = Engine(spec, max_batch=1, max_seq_len=4096, max_output_len=4000)
    try:
        ends = {}
        done, started = threading.Event(), threading.Event()

        def collect(name):
            def on_tokens(tokens, finish, error):
                if tokens:
                    started.set()
                if finish is not None:
                    ends[name] = (finish, error)
                    if len(ends) == 2:
                        done.set()
            return on_tokens

        # min_tokens = max_new_tokens: it runs 4000 tokens (seconds), so the close finds it running
        running = pipeline("Tell me about the ocean.", [], max_new_tokens=4000, min_tokens=4000)
        waiting = pipeline("Next.", [], max_new_tokens=8)
        running.on_tokens, waiting.on_tokens = collect("running"), collect("waiting")
        eng.submit(running)
        eng.submit(waiting)  # max_batch 1: it waits for a place
        assert started.wait(30)
        eng.close("the server is stopping")
        assert done.wait(30)
        assert ends == {"running": ("error", "the server is stopping"), "waiting": ("error", "the server is stopping")}
        with pytest.raises(Unavailable, match="the server is stopping"):
            eng.submit(pipeline("Later.", [], max_new_tokens=4))
    finally:
        eng.shutdown()
