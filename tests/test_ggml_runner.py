"""The engine's ggml runner (llama.cpp's kernels through llama-cpp-python) against the oracle.

float32: greedy output equals transformers' generate on text prompts; on image prompts,
teacher-forced on the oracle's tokens, the argmax agrees wherever the oracle's top-2 margin
exceeds 1e-3. Then what is the ggml runner's own: slot -> llama sequence id reuse, seeded sampling
equal to the torch runner's, quantized weights, positions recovered from the rotary table;
negative controls (without DeepStack rows, or with 1-D positions, the logits move); and the
refusal of a checkpoint llama.cpp cannot serve. The engine's behaviours (batching, joining a
running batch, chunked prefill, cancellation, failures that stay with their sequence, the bounded
queue, end ids) run on both runners in test_engine.py.
"""

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make venv` builds it)")

from qwen3vl_triton.engine import Engine  # noqa: E402
from qwen3vl_triton.engine.ggml_runner import (  # noqa: E402
    GgmlRunner,
    Segment,
    Unsupported,
    positions_from_cos_sin,
    unsupported_reason,
)
from qwen3vl_triton.model import mrope  # noqa: E402
from qwen3vl_triton.model.sampling import SamplingParams  # noqa: E402
from qwen3vl_triton.model.vision import EncodeRequest  # noqa: E402
from tests.oracle import image_bytes  # noqa: E402

TEXT_PROMPTS = ["Tell me about the ocean.", "Hello.", "Write a long story.", "Prompt 3 about things",
                "Describe a red house next to a tall green tree."]
IMAGE_CASES = [
    ("one image", "Describe this image in short.", [image_bytes(100, 150, 1)]),
    ("two images of different sizes", "Compare the two images.", [image_bytes(200, 64, 2), image_bytes(64, 96, 3)]),
    ("portrait and very wide", "Which is brighter?", [image_bytes(48, 256, 4), image_bytes(640, 40, 5)]),
]
MARGIN = 1e-3


@pytest.fixture(scope="module")
def ggml_engine(spec):
    eng = Engine(spec, max_batch=8, max_seq_len=2048, max_output_len=256, runner="ggml")
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def runner(spec):
    """A runner of its own for whole-sequence logits (one sequence, no engine)."""
    r = GgmlRunner(spec, slots=1, max_len=1024, max_num_tokens=512, threads=1, log=lambda *_: None)
    yield r
    r.close()


@pytest.fixture(scope="module")
def encoded(spec, preprocessor, encoder):
    """prompt, images -> (ids with fake ids, table, positions [3, L], delta, cos_sin)."""

    def make(prompt, images):
        p = preprocessor(prompt, images)
        r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        ids = np.asarray(p.input_ids).reshape(-1)
        grid = p.image_grid_thw if p.image_grid_thw is not None else np.zeros((0, 3), np.int64)
        pos, delta = mrope.position_ids(ids, grid, spec)
        return ids, r.prompt_embedding_table, pos, delta, r.mrope_rotary_cos_sin

    return make


def run_together(engine, requests, timeout=120):
    """Submit all, wait for all: per request (ids, finish, error)."""
    results = [None] * len(requests)
    done = [threading.Event() for _ in requests]
    for i, req in enumerate(requests):
        out = []

        def on_tokens(tokens, finish, error, i=i, out=out):
            out.extend(tokens)
            if finish is not None:
                results[i] = (list(out), finish, error)
                done[i].set()

        req.on_tokens = on_tokens
    for req in requests:
        engine.submit(req)
    for d in done:
        assert d.wait(timeout)
    return results


# -- float32 parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_greedy_equals_transformers_generate_on_text(prompt, ggml_engine, pipeline, oracle):
    ids, finish = ggml_engine.generate(pipeline(prompt, [], max_new_tokens=48), timeout=120)
    expected = oracle.generate(prompt, [], 48)
    assert ids == expected
    assert finish == ("stop" if expected[-1] in oracle.end_ids else "length")


def test_prefill_logits_match_transformers(runner, encoded, oracle):
    for prompt, images in [("Two pictures.", [image_bytes(120, 80, 8), image_bytes(64, 200, 9)]), ("Text.", [])]:
        ids, table, pos, _, _ = encoded(prompt, images)
        ours, ref = runner.all_logits(ids, table, pos), oracle.prefill_logits(prompt, images)
        diff = (ours - ref).abs().max().item()
        assert diff <= 5e-4, f"{prompt!r}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("name, prompt, images", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_teacher_forced_argmax_agrees_on_image_prompts(name, prompt, images, runner, encoded, oracle):
    generated = oracle.generate(prompt, images, 24)
    inp = oracle.inputs(prompt, images)
    full = torch.cat([inp.input_ids, torch.tensor([generated[:-1]])], dim=1)
    kw = inp.kwargs()
    text_after = torch.zeros(1, len(generated) - 1, dtype=torch.int)
    kw.update(input_ids=full, attention_mask=torch.ones_like(full),
              mm_token_type_ids=torch.cat([inp.mm_token_type_ids, text_after], 1))
    with torch.inference_mode():
        ref = oracle.model(**kw).logits[0, inp.input_ids.shape[1] - 1:]  # the logits that chose each token
    ids, table, pos, delta, _ = encoded(prompt, images)
    n = len(ids)
    ext = np.arange(n, n + len(generated) - 1) + delta
    ours = runner.all_logits(np.concatenate([ids, generated[:-1]]), table,
                             np.concatenate([pos, np.tile(ext, (3, 1))], axis=1))[n - 1:]
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    decided = margin > MARGIN
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert bool(agree[decided].all()), [(k, float(margin[k])) for k in torch.nonzero(decided & ~agree).flatten()]
    assert int(decided.sum()) >= len(generated) - 2  # the check is not vacuous
    assert (ours - ref).abs().max().item() <= 1e-3


# -- negative controls: the check sees DeepStack and M-RoPE ---------------------------------------

def test_without_deepstack_rows_or_with_1d_positions_the_logits_move(runner, encoded, oracle):
    prompt, images = IMAGE_CASES[1][1], IMAGE_CASES[1][2]
    ids, table, pos, _, _ = encoded(prompt, images)
    ref = oracle.prefill_logits(prompt, images)
    assert (runner.all_logits(ids, table, pos) - ref).abs().max().item() <= 5e-4
    stride = table.shape[0] // 4
    no_deepstack = table.clone()
    no_deepstack[stride:] = 0
    assert (runner.all_logits(ids, no_deepstack, pos) - ref).abs().max().item() > 1.0
    one_d = np.tile(np.arange(len(ids)), (3, 1))
    assert (runner.all_logits(ids, table, one_d) - ref).abs().max().item() > 1.0


# -- positions from the contract -------------------------------------------------------------

@pytest.mark.parametrize("name, prompt, images", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_positions_are_recovered_from_mrope_rotary_cos_sin(name, prompt, images, spec, encoded):
    ids, _, pos, _, cos_sin = encoded(prompt, images)
    cos, sin = mrope.unpack_cos_sin(cos_sin, spec, len(ids))
    assert np.array_equal(positions_from_cos_sin(cos, sin, spec), pos)
    far = np.stack([np.arange(3000) * 1, np.arange(3000) // 7, np.arange(3000) % 11 + 2900])  # any integers in range
    ang = mrope.angles(far, spec)
    assert np.array_equal(positions_from_cos_sin(ang.cos(), ang.sin(), spec), far)
    with pytest.raises(ValueError, match="mrope_rotary_cos_sin is not the M-RoPE table"):
        positions_from_cos_sin(cos.flip(0) * 0.7, sin * 0.7, spec)


def test_a_request_whose_rotary_table_is_not_m_rope_fails_alone(ggml_engine, pipeline, oracle):
    bad = pipeline("Look.", [image_bytes(64, 64, 13)], max_new_tokens=8)
    table = np.asarray(bad.mrope_cos_sin).reshape(-1, 2).copy()
    table[:, 0] *= 0.6  # still in [-1, 1]: the engine's checks let it through
    bad.mrope_cos_sin = table.reshape(-1)
    good = ("Tell me about the ocean.", [], 12)
    results = run_together(ggml_engine, [bad, pipeline(good[0], good[1], max_new_tokens=good[2])])
    assert results[0][1] == "error" and "mrope_rotary_cos_sin" in results[0][2]
    assert results[1][2] is None and results[1][0] == oracle.generate(*good)


def test_slots_reused_and_compacted_keep_every_sequence_its_own(spec, pipeline, oracle):
    # three places for seven requests of different lengths: finished sequences free slots out of
    # order, the scheduler compacts (slot moves), new sequences take freed llama sequence ids
    engine = Engine(spec, max_batch=3, max_seq_len=512, max_output_len=64, runner="ggml")
    try:
        jobs = [(f"Story {i} about things", [], 6 + 5 * (i % 3)) for i in range(7)]
        results = run_together(engine, [pipeline(p, im, max_new_tokens=n) for p, im, n in jobs])
        for (prompt, images, n), (ids, _, error) in zip(jobs, results):
            assert error is None and ids == oracle.generate(prompt, images, n)
        assert engine.stats.max_batch == 3
    finally:
        engine.shutdown()


def test_seeded_sampling_gives_the_torch_runners_tokens(engine, ggml_engine, pipeline):
    def run(eng, seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, **kw)
        return eng.generate(pipeline("Tell me a story.", [], max_new_tokens=20, sampling=params), timeout=60)[0]

    assert run(ggml_engine, 7) == run(ggml_engine, 7) == run(engine, 7)
    assert run(ggml_engine, 7, top_k=5, top_p=0.9) == run(engine, 7, top_k=5, top_p=0.9)
    assert len({tuple(run(ggml_engine, s)) for s in (1, 2, 3)}) > 1


def test_quantized_weights_load_and_generate(spec, pipeline):
    for dtype in ("q8_0", "q4_k"):
        eng = Engine(spec, dtype=dtype, max_batch=2, max_seq_len=512, max_output_len=16, runner="ggml")
        try:
            assert eng.runner.kv_type == "f16" and f"-{dtype}-" in eng.runner.gguf.name
            ids, finish = eng.generate(pipeline("Tell me about the ocean.", [image_bytes(64, 64, 3)],
                                                max_new_tokens=8), timeout=60)
            assert len(ids) >= 1 and finish in ("stop", "length")
        finally:
            eng.shutdown()


def test_a_prefix_restore_copies_the_entrys_cells_not_the_stream_and_computes_the_same(spec):
    """SlotCache.restore's copy (LlamaText.copy_seq) against llama.cpp's own stream copy: the same
    logits bit for bit over the restored prefix, for a fraction of the stream's bytes."""
    r = GgmlRunner(spec, slots=3, max_len=1024, max_num_tokens=256, threads=1, log=lambda *_: None)
    try:
        llama, lib = r.llama, r.llama.lib
        ids = (np.arange(48) * 7 % 200).astype(np.int32)
        llama.decode([Segment.of(0, np.arange(48), ids=ids)])  # the entry: 48 tokens
        lib.llama_memory_seq_cp(llama.mem, 0, 1, -1, -1)  # the stream copy, cut at position 32
        lib.llama_memory_seq_rm(llama.mem, 1, 32, -1)
        copied = llama.copy_seq(0, 2, 32)
        assert lib.llama_memory_seq_pos_max(llama.mem, 2) == 31 and lib.llama_memory_seq_pos_min(llama.mem, 2) == 0
        assert 0 < copied < r.cache.stream_bytes / 10  # 48 tokens' cells of 1024

        def tail(seq):
            return llama.decode([Segment.of(seq, np.arange(32, 48), ids=ids[32:], outputs="all")])[0]

        assert torch.equal(tail(1), tail(2))
        assert lib.llama_memory_seq_pos_max(llama.mem, 0) == 47  # the entry is untouched
    finally:
        r.close()


def test_runs_of_ids_and_rows_cannot_share_a_call(runner):
    ids = Segment.of(0, np.zeros(1), ids=np.zeros(1, np.int32))
    rows = Segment.of(0, np.zeros((4, 1)), rows=np.zeros((1, runner.llama.n_embd_inp), np.float32))
    with pytest.raises(ValueError, match="token ids or embedding rows, not both"):
        runner.llama.decode([ids, rows])


# -- what llama.cpp cannot serve -----------------------------------------------------------------

def test_a_checkpoint_with_a_dense_layer_is_refused_with_the_reason(tmp_path):
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.tiny import build_saved_checkpoint

    spec = ModelSpec.load(build_saved_checkpoint(tmp_path / "dense", mlp_only_layers=[1], log=lambda *_: None))
    reason = unsupported_reason(spec)
    assert "every decoder layer MoE" in reason and "dense layers [1]" in reason and "mlp_only_layers [1]" in reason
    with pytest.raises(Unsupported, match=r"dense layers \[1\]"):
        GgmlRunner(spec, build_dir=tmp_path / "ggml")
    assert not (tmp_path / "ggml").exists()  # refused before any conversion
    with pytest.raises(Unsupported):
        Engine(spec, max_batch=1, max_seq_len=256, runner="ggml")
    eng = Engine(spec, max_batch=1, max_seq_len=256, runner="auto")
    try:
        assert eng.runner_name == "torch" and "dense layers [1]" in eng.runner_note
    finally:
        eng.shutdown()
