"""The engine's decode step beside transformers' own, in one process, warm and cold.

    python -m load_tests.engine_step checkpoints/small [--dtype bfloat16] [--context 284] [--repeats 20]

Warm: the same step repeated (the weights it reads stay in the caches as far as they fit).
Cold: before each timed step a buffer several times the last-level cache is read, so the
weights come from memory, as in real decoding; every step also feeds new token ids, so the
router picks other experts. The machine's rates (matmul fp32/bf16, memory read) are printed
beside the figures. Medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from load_tests.bench_micro import decode_step_bytes, machine_rates


def _evict(buf: torch.Tensor) -> None:
    buf.add_(1.0)  # read and write every line: the weights leave the caches


def median_ms(fn, repeats: int, cold: bool, evict: torch.Tensor, warmup: int = 3) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        if cold:
            _evict(evict)
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bf16_matmul_gflops(repeats: int = 5) -> float:
    n = 1024
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=284)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the steps (the engine decodes on 1)")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)

    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.checkpoint import ModelSpec, torch_dtype
    from qwen3vl_triton.model.lm import LanguageModel, StepSeq

    spec = ModelSpec.load(args.checkpoint)  # first: a missing checkpoint is one line, at once
    rates = machine_rates()
    rates["bf16_matmul_gflops"] = bf16_matmul_gflops()
    print("machine: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    top = max(batches)
    ctx = args.context
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (top, ctx), generator=gen)
    nexts = torch.randint(0, spec.vocab_size, (64, top, 1), generator=gen)  # new ids every step
    evict = torch.zeros(32 * 2**20)  # 128 MiB
    dtype = torch_dtype(args.dtype)
    rows = []

    if not args.no_transformers:
        from transformers import DynamicCache, Qwen3VLMoeForConditionalGeneration

        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).eval()
        for b in batches:
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(input_ids=ids[:b], past_key_values=cache, use_cache=True, logits_to_keep=1)

                def step(i, b=b, cache=cache):
                    model(input_ids=nexts[i % 64, :b], past_key_values=cache, use_cache=True)
                    cache.crop(-1)

                for cold in (False, True):
                    rows.append(("transformers", b, cold, median_ms(step, args.repeats, cold, evict)))
        del model

    lm = LanguageModel(spec, dtype=args.dtype, slots=top, max_len=ctx + 8)
    cos, sin = mrope.text_cos_sin(torch.arange(ctx), spec)
    lm.forward([StepSeq(s, ids[s], 0, cos, sin) for s in range(top)])
    dcos, dsin = mrope.text_cos_sin(torch.tensor([ctx]), spec)
    for b in batches:
        steps = [[StepSeq(s, nexts[i, s], ctx, dcos, dsin) for s in range(b)] for i in range(64)]
        for cold in (False, True):
            rows.append(("engine", b, cold, median_ms(lambda i: lm.forward(steps[i % 64]), args.repeats, cold, evict)))

    size = torch.tensor([], dtype=dtype).element_size()
    print(f"decode step, context {ctx}, {args.dtype}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'':14} {'batch':>5} {'warm ms':>8} {'cold ms':>8} {'floor ms':>9}")
    for who in dict.fromkeys(r[0] for r in rows):
        for b in batches:
            warm, cold = (next(r[3] for r in rows if r[:3] == (who, b, c)) for c in (False, True))
            floor = 1e3 * decode_step_bytes(spec, b, ctx, size)["total"] / (rates["read_gbps"] * 1e9)
            print(f"{who:14} {b:5d} {warm:8.2f} {cold:8.2f} {floor:9.2f}")
    return 0


if __name__ == "__main__":
    from load_tests import run_tool

    raise SystemExit(run_tool(main))
