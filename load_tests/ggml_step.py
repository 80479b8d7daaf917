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
read rate. Every configuration runs in interleaved rounds (a load that comes and goes on a shared
host falls on all alike); medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from load_tests.bench_micro import decode_step_bytes, machine_rates

BYTES = {"float32": 4.0, "bfloat16": 2.0, "q8_0": 34 / 32, "q4_k": 4.5 / 8}


def interleaved(configs: dict, rounds: int, per_round: int, evict: torch.Tensor, warmup: int = 3) -> dict:
    """Median ms of each config's step, warm and cold, measured in interleaved rounds (every
    config `per_round` steps per round), so a load that comes and goes on a shared host falls on
    all of them alike. configs: key -> (prepare(), step(i))."""
    times = {(key, cold): [] for key in configs for cold in (False, True)}
    cpu = {key: [] for key in configs}  # this thread's CPU time of the warm steps
    for prepare, step in configs.values():
        prepare()
        for i in range(warmup):
            step(i)
    i = warmup
    for _ in range(rounds):
        for key, (prepare, step) in configs.items():
            prepare()
            for cold in (False, True):
                for _ in range(per_round):
                    if cold:
                        evict.add_(1.0)
                    t0, c0 = time.perf_counter(), time.thread_time()
                    step(i)
                    times[(key, cold)].append(time.perf_counter() - t0)
                    if not cold:
                        cpu[key].append(time.thread_time() - c0)
                    i += 1
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out.update({(key, "cpu"): 1e3 * statistics.median(v) for key, v in cpu.items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--dtypes", default="float32,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--context", type=int, default=284)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--kv", default="streams",
                    help="streams (a KV stream per sequence, the runner's), unified, or both: streams,unified")
    args = ap.parse_args(argv)

    from qwen3vl_triton.engine.ggml_runner import GgmlRunner, Segment
    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.lm import LanguageModel, StepSeq
    from qwen3vl_triton.model.sampling import SamplingParams

    spec = ModelSpec.load(args.checkpoint)  # first: a missing checkpoint is one line, at once
    rates = machine_rates()
    print("machine: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    batches = [int(b) for b in args.batches.split(",")]
    top, ctx = max(batches), args.context
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (top, ctx), generator=gen)
    nexts = torch.randint(0, spec.vocab_size, (64, top), generator=gen)
    evict = torch.zeros(32 * 2**20)  # 128 MiB
    configs, runners = {}, []
    for dtype, kv in ((d, k) for d in args.dtypes.split(",") for k in args.kv.split(",")):
        runner = GgmlRunner(spec, dtype, slots=top, max_len=ctx + 8, max_num_tokens=ctx, threads=2,
                            unified=kv == "unified", log=lambda *_: None)
        name = f"ggml {dtype}" + (" unified" if kv == "unified" else "")
        runners.append(runner)
        llama = runner.llama
        for s in range(top):
            llama.decode([Segment.of(s, np.arange(ctx), ids=ids[s].numpy().astype(np.int32))])
        for threads in (int(t) for t in args.threads.split(",")):
            for b in batches:
                def step(i, b=b, llama=llama):
                    llama.decode([Segment(np.arange(b, dtype=np.int32), np.full(b, ctx, np.int32),
                                          nexts[i % 64, :b].numpy().astype(np.int32), out=np.ones(b, bool))])
                    for s in range(b):
                        llama.lib.llama_memory_seq_rm(llama.mem, s, ctx, -1)

                configs[(name, threads, b)] = (lambda t=threads, llama=llama: llama.set_threads(t), step)

        # the whole runner step, as the engine calls it (1 thread, batch `top`)
        class _Req:
            sampling = SamplingParams()
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

        def run_step(i, runner=runner, seqs=seqs):
            for s, q in enumerate(seqs):
                q.tokens[-1] = int(nexts[i % 64, s])
            runner.run([(q, 1) for q in seqs])
            for s in range(top):
                runner.llama.lib.llama_memory_seq_rm(runner.llama.mem, s, ctx, -1)

        def one_thread(runner=runner):
            runner.shared_threads = 1

        configs[(name + " +run", 1, top)] = (one_thread, run_step)

    if not args.no_torch:
        lm = LanguageModel(spec, dtype="float32", slots=top, max_len=ctx + 8)
        cos, sin = mrope.text_cos_sin(torch.arange(ctx), spec)
        lm.forward([StepSeq(s, ids[s], 0, cos, sin) for s in range(top)])
        dcos, dsin = mrope.text_cos_sin(torch.tensor([ctx]), spec)
        for threads in (int(t) for t in args.threads.split(",")):
            for b in batches:
                steps = [[StepSeq(s, nexts[i, s:s + 1], ctx, dcos, dsin) for s in range(b)] for i in range(64)]
                configs[("torch float32", threads, b)] = (lambda t=threads: torch.set_num_threads(t),
                                                          lambda i, steps=steps: lm.forward(steps[i % 64]))
    medians = interleaved(configs, args.rounds, args.per_round, evict)
    rows = [(*key, cold, ms) for (key, cold), ms in medians.items() if cold != "cpu"]

    print(f"decode step, context {ctx}, median of {args.rounds} interleaved rounds of {args.per_round} steps")
    print(f"{'':26} {'threads':>7} {'batch':>5} {'warm ms':>8} {'cold ms':>8} {'floor ms':>9} {'cpu ms':>7}")
    for who, threads, b in dict.fromkeys(r[:3] for r in rows):
        cpu = medians[((who, threads, b), "cpu")]
        warm = next((r[4] for r in rows if r[:4] == (who, threads, b, False)), float("nan"))
        cold = next((r[4] for r in rows if r[:4] == (who, threads, b, True)), float("nan"))
        dtype = who.split()[1]
        kv = 4.0 if dtype == "float32" else 2.0  # the runner's cells: f32 for float32, f16 otherwise
        need = (decode_step_bytes(spec, b, ctx, BYTES[dtype])["weights"]
                + decode_step_bytes(spec, b, ctx, kv)["kv_cache"])
        floor = 1e3 * need / (rates["read_gbps"] * 1e9)
        # cpu: the calling thread's CPU time of a warm step -- the whole step on 1 thread (ggml and
        # torch compute on the calling thread then), robust to a busy host's preemption
        print(f"{who:26} {threads:7d} {b:5d} {warm:8.2f} {cold:8.2f} {floor:9.2f} {cpu:7.2f}")
    return 0


if __name__ == "__main__":
    from load_tests import run_tool

    raise SystemExit(run_tool(main))
