"""In-process micro-benchmarks of the bench: the machine's roofline, the engine's batch-8 decode
step against transformers' own, and np.copyto as the yardstick of the shared-memory transfer.

Timings are medians over repeats after a warm-up; they are figures for the report, never asserted.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch


def _seconds(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    return statistics.median(_seconds(fn, repeats, warmup))


# -- the machine ----------------------------------------------------------------------------------
def machine_rates(repeats: int = 7) -> dict:
    """Peak matmul rates in fp32 and bf16 (GFLOP/s; bf16 runs on AMX or AVX512-BF16 where the CPU
    has them, and is emulated, slower than fp32, where it has not), memory read and copy bandwidth
    (GB/s) with torch's threads: the best of `repeats`, since the physical limit is what a quiet
    moment shows."""
    big = torch.ones(64 * 2**20)  # 256 MiB: far beyond the caches, like streaming the weights
    dst = torch.empty_like(big)
    read = min(_seconds(lambda: big.sum(), repeats))
    copy = min(_seconds(lambda: dst.copy_(big), repeats))
    nbytes = big.numel() * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # what one core reads (the engine decodes on one thread)
        read1 = min(_seconds(lambda: big.sum(), repeats))
    finally:
        torch.set_num_threads(threads)
    return {
        "read_gbps_1_thread": nbytes / read1 / 1e9,
        "matmul_gflops": matmul_gflops(torch.float32, repeats),
        "matmul_bf16_gflops": matmul_gflops(torch.bfloat16, repeats, budget_s=0.05),
        "read_gbps": nbytes / read / 1e9,
        "copy_gbps": 2 * nbytes / copy / 1e9,  # bytes read + bytes written
        "torch_threads": torch.get_num_threads(),
    }


def matmul_gflops(dtype: torch.dtype, repeats: int = 7, n: int = 1024, budget_s: float | None = None) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype`. With `budget_s`, a first small matmul sizes
    the timed ones so that each takes about that long at most: a CPU without native bf16 runs
    bf16 matmuls hundreds of times slower than fp32."""
    if budget_s is not None:
        small = 128
        a, b = torch.randn(small, small, dtype=dtype), torch.randn(small, small, dtype=dtype)
        rate = 2 * small ** 3 / min(_seconds(lambda: torch.mm(a, b), 2, warmup=1))
        n = min(n, max(small, int((rate * budget_s / 2) ** (1 / 3)) // small * small))
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / min(_seconds(lambda: torch.mm(a, b), repeats)) / 1e9


def count_flops(fn) -> int:
    """FLOPs of the matmuls and attention that `fn` runs (torch's own counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def decode_step_bytes(spec, batch: int, context: int, dtype_bytes: int = 4) -> dict:
    """Bytes one decode step must read: weights touched (attention, router, the experts the batch
    selects, norms, lm_head, its embedding rows) and the KV cache of the batch.

    Experts: each token picks `k` of `E`; with uniform routing a batch of `b` touches on average
    E * (1 - (1 - k/E)^b) distinct experts per layer."""
    h, d = spec.hidden_size, spec.head_dim
    attn = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    expert = 3 * h * spec.moe_intermediate_size
    dense = 3 * h * spec.intermediate_size
    e, k = spec.num_experts, spec.experts_per_token
    distinct = e * (1 - (1 - k / e) ** batch) if e else 0.0
    per_layer = [attn + (h * e + distinct * expert if spec.is_moe_layer(i) else dense) + 4 * h
                 for i in range(spec.num_layers)]
    weights = (sum(per_layer) + h * spec.vocab_size + batch * h + h) * dtype_bytes
    kv = 2 * spec.num_layers * spec.num_kv_heads * d * context * batch * dtype_bytes
    return {"weights": weights, "kv_cache": kv, "total": weights + kv, "experts_per_layer": distinct}


# -- engine vs transformers decode step ----------------------------------------------------------------
def decode_step(checkpoint, context: int, batch: int = 8, repeats: int = 20, log=print) -> dict:
    """Median seconds of one decode step at `context` tokens of cache, for the engine's
    LanguageModel.forward (`batch` decode StepSeqs) and for transformers'
    Qwen3VLMoeForConditionalGeneration forward (input `[batch, 1]`, a DynamicCache), same weights.
    Both also at batch 1. The cache is cropped back after each transformers step, so every step
    sees the same context length; the engine overwrites the same cache position."""
    from transformers import DynamicCache, Qwen3VLMoeForConditionalGeneration

    from qwen3vl_triton.engine.runner import DECODE_THREADS
    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.lm import LanguageModel, StepSeq

    spec = ModelSpec.load(checkpoint)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, context), generator=gen)
    nxt = torch.randint(0, spec.vocab_size, (batch, 1), generator=gen)
    out = {"context": context, "batch": batch}

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    for b in (1, batch):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=ids[:b], past_key_values=cache, use_cache=True, logits_to_keep=1)

            def step():
                model(input_ids=nxt[:b], past_key_values=cache, use_cache=True)
                cache.crop(-1)

            out[f"transformers_b{b}_ms"] = 1e3 * _median_seconds(step, repeats, warmup=3)
        log(f"[bench] transformers decode step b{b}: {out[f'transformers_b{b}_ms']:.2f} ms")
    model = None  # free the oracle's weights before the engine loads

    lm = LanguageModel(spec, slots=batch, max_len=context + 8)
    cos, sin = mrope.text_cos_sin(torch.arange(context), spec)
    lm.forward([StepSeq(s, ids[s], 0, cos, sin) for s in range(batch)])  # prefill every slot
    dcos, dsin = mrope.text_cos_sin(torch.tensor([context]), spec)
    for b in (1, batch):
        seqs = [StepSeq(s, nxt[s], context, dcos, dsin) for s in range(b)]
        out[f"engine_b{b}_ms"] = 1e3 * _median_seconds(lambda: lm.forward(seqs), repeats, warmup=3)
        log(f"[bench] engine decode step b{b}: {out[f'engine_b{b}_ms']:.2f} ms")
    # the served engine decodes on DECODE_THREADS: its step, for what serving adds to a token
    threads = torch.get_num_threads()
    torch.set_num_threads(DECODE_THREADS)
    try:
        seqs = [StepSeq(0, nxt[0], context, dcos, dsin)]
        out["engine_b1_served_threads_ms"] = 1e3 * _median_seconds(lambda: lm.forward(seqs), repeats, warmup=3)
    finally:
        torch.set_num_threads(threads)
    log(f"[bench] engine decode step b1 on {DECODE_THREADS} thread(s), as served: "
        f"{out['engine_b1_served_threads_ms']:.2f} ms")
    out["decode_step_b8_ratio"] = out[f"engine_b{batch}_ms"] / out[f"transformers_b{batch}_ms"]
    out["transformers_b8_over_b1"] = out[f"transformers_b{batch}_ms"] / out["transformers_b1_ms"]
    out["engine_b8_over_b1"] = out[f"engine_b{batch}_ms"] / out["engine_b1_ms"]
    return out


def ggml_decode_step(checkpoint, gguf, context: int, dtype: str = "float32", batch: int = 8, repeats: int = 20,
                     threads: int | None = None, log=print) -> dict:
    """Median ms of the ggml runner's decode step (one `llama_decode` of `batch` or 1 sequences at
    `context` tokens of cache, logits copied out) on `threads` (default: the served engine's
    decode threads), with new token ids every step (the router picks other experts, as in
    serving); the step is undone after timing, so the cache stays at `context`."""
    from qwen3vl_triton.engine.ggml_runner import GgmlRunner, Segment
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.serve.cpu_engine import engine_threads

    spec = ModelSpec.load(checkpoint)
    threads = threads or engine_threads("ggml", os.cpu_count() or 1)[1]
    runner = GgmlRunner(spec, dtype, slots=batch, max_len=context + 8, max_num_tokens=context, threads=threads,
                        gguf=gguf, log=lambda *_: None)
    llama = runner.llama
    try:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, spec.vocab_size, (batch, context), generator=gen).numpy().astype(np.int32)
        nexts = torch.randint(0, spec.vocab_size, (64, batch), generator=gen).numpy().astype(np.int32)
        llama.set_threads(os.cpu_count() or 1)
        for s in range(batch):
            llama.decode([Segment.of(s, np.arange(context), ids=ids[s])])
        llama.set_threads(threads)
        out = {"context": context, "threads": threads, "dtype": dtype}
        for b in (1, batch):
            i = [0]

            def step(b=b, i=i):
                i[0] += 1
                llama.decode([Segment(np.arange(b, dtype=np.int32), np.full(b, context, np.int32), nexts[i[0] % 64, :b],
                                      out=np.ones(b, bool))])
                for s in range(b):
                    llama.lib.llama_memory_seq_rm(llama.mem, s, context, -1)

            out[f"b{b}_ms"] = 1e3 * _median_seconds(step, repeats, warmup=3)
            log(f"[bench] ggml {dtype} decode step b{b} on {threads} thread(s): {out[f'b{b}_ms']:.2f} ms")
        return out
    finally:
        runner.close()


# -- the yardstick of the shared-memory transfer -------------------------------------------------------
def region_copy_seconds(path, offset: int, nbytes: int, repeats: int = 20) -> dict:
    """Median seconds of what the language server does with a shared-memory chunk (transfer/region.py
    Region.read_into): os.preadv from the region file into a table allocated for the sequence
    (np.zeros: fresh pages, zeroed and mapped by the kernel at first touch), and into one already
    touched; and of np.copyto into fresh pages, against which the pre-touched copy is the yardstick."""
    import os

    fd = os.open(str(path), os.O_RDONLY)
    try:
        def pread(dest):
            view, done = memoryview(dest.reshape(-1).view(np.uint8)), 0
            while done < nbytes:
                done += os.preadv(fd, [view[done:]], offset + done)

        touched = np.ones(nbytes // 4, np.float32)
        src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
        return {"pread_fresh_table": _median_seconds(lambda: pread(np.zeros(nbytes // 4, np.float32)), repeats),
                "pread_touched_table": _median_seconds(lambda: pread(touched), repeats),
                "memcpy_fresh_table": _median_seconds(lambda: np.copyto(np.zeros(nbytes // 4, np.float32), src),
                                                      repeats)}
    finally:
        os.close(fd)


def memcpy_seconds(nbytes: int, repeats: int = 20) -> float:
    """Median seconds of np.copyto between two pre-touched float32 buffers of `nbytes`.

    (np.copyto is a plain memcpy; OPENBLAS_* settings do not affect it.)"""
    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst.fill(1.0)
    return _median_seconds(lambda: np.copyto(dst, src), repeats)
