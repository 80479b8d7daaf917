"""Prefix KV reuse, measured in process: time to the first token of a conversation's second turn
against its first, with the engine's prefix cache on (`kv_cache_bytes`) and off, on one engine
each, through the package's preprocessing and vision encoder (its image cache on, as served).

    python -m load_tests.prefix_ttft --checkpoint checkpoints/small            # ggml runner
    python -m load_tests.prefix_ttft --checkpoint checkpoints/small --runner torch

Each round is a new conversation with a new image (seeded): turn 1 (image + question) is prefilled
whole; turn 2 (turn 1, its answer, a follow-up question) starts from turn 1's KV when the cache
is on. The vision encoder's cache serves the image in turn 2 either way, so the difference is
the language model's prefill. Prints per round and the medians, the ratio turn 2 / turn 1, the
prefix cache's counters and the machine's CPU model and features.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def first_token(engine, req, timeout: float = 600.0) -> tuple[float, list[int]]:
    """Seconds from submit to the first token, and every generated id."""
    got, done, t0 = [], threading.Event(), time.perf_counter()
    first: list[float] = []

    def on_tokens(tokens, finish, error):
        if tokens and not first:
            first.append(time.perf_counter())
        got.extend(tokens)
        if finish is not None:
            done.set()

    req.on_tokens = on_tokens
    engine.submit(req)
    if not done.wait(timeout):
        raise TimeoutError("generation did not finish")
    return first[0] - t0, got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small"))
    ap.add_argument("--runner", default="ggml", choices=("ggml", "torch"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20)
    args = ap.parse_args(argv)

    import torch

    from load_tests.bench_report import cpu_features
    from load_tests.workload import make_image
    from qwen3vl_triton.engine import Engine, Request
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.serve.cpu_engine import engine_threads
    from qwen3vl_triton.text.preprocess import Preprocessor

    spec = ModelSpec.load(args.checkpoint)
    pre = Preprocessor(spec, max_images=4, max_input_len=4095)
    encoder = VisionEncoder(spec, cache_bytes=256 * 2**20)
    prefill, decode = engine_threads(args.runner, torch.get_num_threads(), 0, 0)
    engines = {name: Engine(spec, max_batch=4, max_seq_len=4096, max_output_len=256, runner=args.runner,
                            threads=prefill, shared_threads=decode, kv_cache_bytes=kv)
               for name, kv in (("on", args.kv_cache_bytes), ("off", 0))}
    if engines["on"].prefix is None:
        print(f"prefix cache off: {engines['on'].prefix_note}")
        return 1

    def request(conversation, images):
        p = pre.render(conversation, images)
        r = encoder.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
        return Request(p.input_ids, args.max_tokens, end_id=spec.end_id, stop_ids=spec.end_ids,
                       table=r.prompt_embedding_table, mrope_cos_sin=r.mrope_rotary_cos_sin,
                       mrope_delta=r.mrope_position_deltas, extra_ids=r.prompt_table_extra_ids)

    def user(text, images=0):
        return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}

    rows = {name: [] for name in engines}
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        image = [make_image(args.size, args.size, 2000 + r)]
        for name, engine in engines.items():
            conv = [user("Describe this image in short.", 1)]
            t1, ids = first_token(engine, request(conv, image))
            text = pre.tokenizer.decode([i for i in ids if i not in spec.end_ids], skip_special_tokens=True)
            conv += [{"role": "assistant", "content": [{"type": "text", "text": text}]},
                     user("What else is in it? Answer in one sentence.")]
            turn2 = request(conv, image)
            hits = engine.prefix.stats.hit_tokens if engine.prefix else 0
            t2, _ = first_token(engine, turn2)
            reused = (engine.prefix.stats.hit_tokens - hits) if engine.prefix else 0
            if r:
                rows[name].append((t1, t2, int(turn2.input_ids.size), reused))
                print(f"round {r} cache {name:3}: turn 1 {t1 * 1e3:7.1f} ms, turn 2 {t2 * 1e3:7.1f} ms "
                      f"({turn2.input_ids.size} prompt tokens, {reused} reused), ratio {t2 / t1:.2f}")
    print()
    for name, got in rows.items():
        t1 = statistics.median(x[0] for x in got)
        t2 = statistics.median(x[1] for x in got)
        print(f"cache {name:3} ({args.runner}): turn 1 TTFT p50 {t1 * 1e3:.1f} ms, turn 2 p50 {t2 * 1e3:.1f} ms, "
              f"turn 2 / turn 1 = {t2 / t1:.2f}")
    stats = engines["on"].prefix.stats
    print(f"prefix cache: hit tokens {stats.hit_tokens}, miss tokens {stats.miss_tokens}, entries {stats.entries}, "
          f"bytes {stats.bytes}, evictions {stats.evictions}")
    facts = cpu_features()
    print(f"cpu: {facts['cpu_model']}; {len(__import__('os').sched_getaffinity(0))} cores; "
          f"features {' '.join(facts['cpu_flags'])}; bf16 matrix: {facts['bf16_matrix_instructions'] or 'none'}")
    for engine in engines.values():
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
