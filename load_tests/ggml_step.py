"""The ggml runner's decode step beside the torch runner's, in one process, warm and cold.

    python -m load_tests.ggml_step checkpoints/small [--dtypes float32,q8_0] [--threads 1,2] [--context 284]

As load_tests/engine_step.py: every sequence holds `context` tokens of cache; a step decodes one
new token per sequence (new ids every step, so the router picks other experts) and is undone
afterwards (the cache stays at `context`). Warm: the weights stay in the caches as far as they
fit; cold: a buffer several times the last-level cache is read before each timed step. The ggml
figure is one `llama_decode` of the batch with its logits copied out (LlamaText.decode); "+run"
is the whole runner step as the engine calls it (inputs, decode, sampling). The torch figure is
`LanguageModel.forward`. The floor is the bytes a step must read (bench_micro.decode_step_bytes:
weights at f32 4 bytes, q8_0 34/32; KV cells f32, or f16 for the quantized) over the measured
read rate. Medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from load_tests.bench_micro import decode_step_bytes, machine_rates

BYTES = {"float32": 4.0, "bfloat16": 2.0, "q8_0": 34 / 32, "q4_k": 4.5 / 8}


def median_ms(fn, repeats: int, cold: bool, evict: torch.Tensor, warmup: int = 3) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        if cold:
            evict.add_(1.0)
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dtypes", default="float32,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--context", type=int, default=284)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--unified", action="store_true", help="one unified KV cache instead of a stream per sequence")
    args = ap.parse_args(argv)

    from qwen3vl_triton import mrope
    from qwen3vl_triton.checkpoint import ModelSpec
    from qwen3vl_triton.ggml_runner import GgmlRunner, Segment
    from qwen3vl_triton.lm import LanguageModel, StepSeq

    rates = machine_rates()
    print("machine: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    spec = ModelSpec.load(args.checkpoint)
    batches = [int(b) for b in args.batches.split(",")]
    top, ctx = max(batches), args.context
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (top, ctx), generator=gen)
    nexts = torch.randint(0, spec.vocab_size, (64, top), generator=gen)
    evict = torch.zeros(32 * 2**20)  # 128 MiB
    rows = []

    for dtype in args.dtypes.split(","):
        runner = GgmlRunner(spec, dtype, slots=top, max_len=ctx + 8, max_num_tokens=ctx, threads=2,
                            unified=args.unified, log=lambda *_: None)
        llama = runner.llama
        for s in range(top):
            llama.decode([Segment.of(s, np.arange(ctx), ids=ids[s].numpy().astype(np.int32))])
        for threads in (int(t) for t in args.threads.split(",")):
            llama.set_threads(threads)
            for b in batches:
                def step(i, b=b):
                    llama.decode([Segment(np.arange(b, dtype=np.int32), np.full(b, ctx, np.int32),
                                          nexts[i % 64, :b].numpy().astype(np.int32), out=np.ones(b, bool))])
                    for s in range(b):
                        llama.lib.llama_memory_seq_rm(llama.mem, s, ctx, -1)

                for cold in (False, True):
                    rows.append((f"ggml {dtype}", threads, b, cold, median_ms(step, args.repeats, cold, evict)))
        # the whole runner step, as the engine calls it (1 thread, batch `top`)
        runner.shared_threads = 1

        class _Req:
            sampling = __import__("qwen3vl_triton.sampling", fromlist=["SamplingParams"]).SamplingParams()
            mrope_delta, table = 0, None

        class _Seq:
            pass

        seqs = []
        for s in range(top):
            q = _Seq()
            q.req, q.slot, q.prompt_len, q.cached, q.gen = _Req(), s, ctx, ctx, None
            q.tokens = [0] * ctx + [0]
            runner.cache.ids[s] = s
            seqs.append(q)

        def run_step(i):
            for s, q in enumerate(seqs):
                q.tokens[-1] = int(nexts[i % 64, s])
            runner.run([(q, 1) for q in seqs])
            for s in range(top):
                llama.lib.llama_memory_seq_rm(llama.mem, s, ctx, -1)

        rows.append((f"ggml {dtype} +run", 1, top, False, median_ms(run_step, args.repeats, False, evict)))
        runner.close()

    if not args.no_torch:
        lm = LanguageModel(spec, dtype="float32", slots=top, max_len=ctx + 8)
        cos, sin = mrope.text_cos_sin(torch.arange(ctx), spec)
        lm.forward([StepSeq(s, ids[s], 0, cos, sin) for s in range(top)])
        dcos, dsin = mrope.text_cos_sin(torch.tensor([ctx]), spec)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for b in batches:
                steps = [[StepSeq(s, nexts[i, s:s + 1], ctx, dcos, dsin) for s in range(b)] for i in range(64)]
                for cold in (False, True):
                    rows.append(("torch float32", threads, b, cold,
                                 median_ms(lambda i: lm.forward(steps[i % 64]), args.repeats, cold, evict)))

    print(f"decode step, context {ctx}, median of {args.repeats}")
    print(f"{'':22} {'threads':>7} {'batch':>5} {'warm ms':>8} {'cold ms':>8} {'floor ms':>9}")
    for who, threads, b in dict.fromkeys(r[:3] for r in rows):
        warm = next((r[4] for r in rows if r[:4] == (who, threads, b, False)), float("nan"))
        cold = next((r[4] for r in rows if r[:4] == (who, threads, b, True)), float("nan"))
        dtype = who.split()[1]
        kv = 4.0 if dtype == "float32" else 2.0  # the runner's cells: f32 for float32, f16 otherwise
        need = decode_step_bytes(spec, b, ctx, BYTES[dtype])["weights"] + decode_step_bytes(spec, b, ctx, kv)["kv_cache"]
        floor = 1e3 * need / (rates["read_gbps"] * 1e9)
        print(f"{who:22} {threads:7d} {b:5d} {warm:8.2f} {cold:8.2f} {floor:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
