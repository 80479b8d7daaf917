"""How closely the ggml runner computes the model, per dtype, against the fp32 oracle and against
llama.cpp's own server on the same inputs.

    python -m load_tests.ggml_parity [--checkpoint checkpoints/small] [--tokens 64] [--no-llamacpp]

For each prompt the oracle (transformers' Qwen3VLMoeForConditionalGeneration, fp32) generates
`tokens` greedy tokens with the end ids suppressed (so every prompt gives that many positions);
then, teacher-forced on those tokens, every position's argmax (end ids suppressed on every side)
is compared with the oracle's:

- ours: the ggml runner on the checkpoint's GGUF of each dtype (float32, bfloat16, q8_0, q4_k),
  with the project's preprocessing and vision tower (float32, bfloat16 for bfloat16), computed as
  serving computes it: the prompt in one call, then the teacher-forced tokens one call each (a
  quantized or bf16 matmul rounds differently for one row than for many, so the shape matters);
- llama.cpp: llama-server on the GGUF files of the same conversion (f32, bf16, q8_0, q4_k) --
  text prompts only, as token ids through `/completion`, one request per position (llama-server
  takes a prompt of token ids only without images);
- image prompts, free-running on both sides (the same request through the engine, and through
  llama-server's chat endpoint with its own vision tower): how many greedy tokens equal the
  oracle's before the first difference.

float32: wherever the oracle's top-2 margin exceeds 1e-3 the argmax must agree; the report lists
every disagreement with its margin. Writes load_tests/reports/ggml-parity-<checkpoint>.json and
prints a table. Exit status 1 when float32 disagrees where the margin exceeds 1e-3, or its greedy
output differs from the oracle's on a text prompt.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"float32": "f32", "bfloat16": "bf16", "q8_0": "q8_0", "q4_k": "q4_k"}  # ours -> llama.cpp's file type
MARGIN = 1e-3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="default: checkpoints/small (built when missing)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--no-llamacpp", action="store_true", help="ours only (no llama-server)")
    ap.add_argument("--out-dir", default=str(ROOT / "load_tests" / "reports"))
    args = ap.parse_args(argv)

    import torch

    from load_tests import bench_llamacpp as peer
    from load_tests.bench_load import PROMPTS, seeded_image
    from qwen3vl_triton.engine.engine import Engine
    from qwen3vl_triton.engine.ggml_runner import GgmlRunner
    from qwen3vl_triton.engine.ggml_weights import ensure_text_gguf
    from qwen3vl_triton.engine.scheduler import Request
    from qwen3vl_triton.model import mrope
    from qwen3vl_triton.model.checkpoint import ModelSpec
    from qwen3vl_triton.model.tiny import ensure_checkpoint
    from qwen3vl_triton.model.vision import EncodeRequest, VisionEncoder
    from qwen3vl_triton.text.preprocess import Preprocessor
    from tests.oracle import Oracle

    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(ROOT / "checkpoints" / "small",
                                                                                 "small")
    spec = ModelSpec.load(checkpoint)
    oracle = Oracle(checkpoint)
    pre = Preprocessor(spec, max_images=2)
    n = args.tokens
    end_ids = sorted(set(oracle.end_ids))  # the ids oracle_ids suppresses, as llama-server's ignore_eos does
    texts = [(p, []) for p in PROMPTS] + [("Write a long story about the sea and the wind.", [])]
    images = [(PROMPTS[i % len(PROMPTS)], [seeded_image(448, 448, seed=i)]) for i in range(3)]
    images.append(("Compare the two images.", [seeded_image(320, 224, seed=7), seeded_image(224, 320, seed=8)]))

    def masked(logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[..., end_ids] = float("-inf")
        return out

    # -- the oracle: greedy continuations (end ids suppressed) and their teacher-forced logits ---------------
    t0 = time.perf_counter()
    cases = []
    for prompt, imgs in texts + images:
        cont = peer.oracle_ids(oracle, prompt, imgs, n)
        inp = oracle.inputs(prompt, imgs)
        full = torch.cat([inp.input_ids, torch.tensor([cont[:-1]])], dim=1)
        kw = inp.kwargs()
        kw.update(input_ids=full, attention_mask=torch.ones_like(full),
                  mm_token_type_ids=torch.cat([inp.mm_token_type_ids, torch.zeros(1, n - 1, dtype=torch.int)], 1))
        with torch.inference_mode():
            ref = masked(oracle.model(**kw).logits[0, inp.input_ids.shape[1] - 1:])  # (n, vocab)
        top2 = ref.topk(2, dim=-1).values
        cases.append({"prompt": prompt, "images": imgs, "cont": cont, "ref": ref,
                      "margin": (top2[:, 0] - top2[:, 1]).numpy(), "oracle_prompt_tokens": int(inp.input_ids.shape[1])})
    print(f"[parity] oracle: {len(cases)} prompts x {n} tokens in {time.perf_counter() - t0:.0f}s", flush=True)

    report: dict = {"checkpoint": str(checkpoint), "tokens": n, "margin": MARGIN, "dtypes": {}}
    failures = []
    dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype in dtypes:
        float_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
        enc = VisionEncoder(spec, dtype=float_dtype)
        gguf = ensure_text_gguf(checkpoint, dtype, log=lambda m: print(m, flush=True))
        runner = GgmlRunner(spec, dtype, slots=1, max_len=2048, max_num_tokens=1024, threads=os.cpu_count(),
                            gguf=gguf, log=lambda *_: None)
        rows = []
        for case in cases:
            p = pre(case["prompt"], case["images"])
            r = enc.encode([EncodeRequest(p.input_ids, p.pixel_values, p.image_grid_thw)])[0]
            ids = np.asarray(p.input_ids).reshape(-1)
            grid = p.image_grid_thw if p.image_grid_thw is not None else np.zeros((0, 3), np.int64)
            pos, delta = mrope.position_ids(ids, grid, spec)
            ext = np.arange(ids.size, ids.size + n - 1) + delta
            logits = stepwise(runner, ids, r.prompt_embedding_table, pos, case["cont"][:-1], ext)
            ours = masked(logits)
            agree = (ours.argmax(-1) == case["ref"].argmax(-1)).numpy()
            disagree = [(int(k), float(case["margin"][k])) for k in np.flatnonzero(~agree)]
            rows.append({"prompt": case["prompt"], "images": len(case["images"]), "prompt_tokens": int(ids.size),
                         "oracle_prompt_tokens": case["oracle_prompt_tokens"], "agree": int(agree.sum()),
                         "positions": n, "max_abs_logit_diff": float((logits - case["ref"]).nan_to_num(
                             posinf=0, neginf=0).abs().max()), "disagreements": disagree})
        runner.close()
        for row in rows:  # free-running greedy equals teacher-forced up to the first difference
            row["greedy_prefix"] = min([k for k, _ in row["disagreements"]], default=n)
        if dtype == "float32":  # the served path on text prompts: greedy through the engine, end ids live
            engine = Engine(spec, dtype=dtype, max_batch=1, max_seq_len=2048, max_output_len=n, runner="ggml",
                            gguf=gguf)
            try:
                for case, row in zip(cases, rows):
                    if not case["images"]:
                        p = pre(case["prompt"], [])
                        got, _ = engine.generate(Request(p.input_ids, n, end_id=spec.end_id, stop_ids=spec.end_ids),
                                                 timeout=600)
                        row["greedy_equal"] = got == oracle.generate(case["prompt"], [], n)
            finally:
                engine.shutdown()
        report["dtypes"][dtype] = {"ours": rows}
        if dtype == "float32":
            for row in rows:
                bad = [(k, m) for k, m in row["disagreements"] if m > MARGIN]
                if bad:
                    failures.append(f"float32 {row['prompt']!r}: argmax differs where the margin exceeds {MARGIN}: "
                                    f"{bad}")
                if not row["images"] and not row["greedy_equal"]:
                    failures.append(f"float32 {row['prompt']!r}: the engine's greedy output differs from the "
                                    "oracle's generate")
        print(f"[parity] {dtype}: ours done", flush=True)

    if not args.no_llamacpp:
        from builders.llamacpp import build, convert

        binary = build.ensure_server()
        report["llamacpp"] = peer.server_version(binary)
        for dtype in dtypes:
            outtype = DTYPES[dtype]
            files = convert.ensure_gguf(checkpoint, outtype, log=lambda m: print(m, flush=True))
            log_file = ROOT / "build" / "parity" / f"llamacpp-{outtype}.log"
            with peer.LlamaServer(binary, *files, log_file, slots=1).start(log=lambda m: print(m, flush=True)) as srv:
                session = peer.LlamaCppSession(srv.address)
                rows = []
                for case in cases:
                    row = {"prompt": case["prompt"], "images": len(case["images"]), "positions": n}
                    if not case["images"]:
                        prompt_ids = oracle.inputs(case["prompt"], []).input_ids[0].tolist()
                        chosen = [_next_token(srv.address, prompt_ids + case["cont"][:k]) for k in range(n)]
                        row["agree"] = int((np.array(chosen) == case["ref"].argmax(-1).numpy()).sum())
                    ids, prompt_tokens = session.token_ids(case["prompt"], case["images"], n)
                    row.update(greedy_prefix=_prefix(ids, case["cont"]), prompt_tokens=prompt_tokens)
                    rows.append(row)
                report["dtypes"][dtype]["llamacpp"] = rows
            print(f"[parity] {dtype}: llama.cpp done", flush=True)

    out = Path(args.out_dir) / f"ggml-parity-{checkpoint.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["failures"] = failures
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\n[parity] wrote {out}")
    for f in failures:
        print(f"[parity] FAILED: {f}")
    return 1 if failures else 0


def stepwise(runner, ids, table, pos, forced, forced_pos):
    """Logits `[1 + len(forced), vocab]`: the prompt's last position (the prompt in one call, as a
    lone prefill is served), then each forced token decoded alone at its position (as decode steps
    are served). Uses llama sequence 0 and empties it before and after."""
    import torch

    from qwen3vl_triton.engine.ggml_runner import Segment

    seq = runner.check_sequence(ids, table, pos)
    llama = runner.llama
    llama.clear(0)
    try:
        rows = [s for s in (llama.decode([seg])[0] for seg in runner.segments(seq, len(ids), 0)) if s is not None]
        out = [rows[-1][-1]]
        for tok, p in zip(forced, forced_pos):
            out.append(llama.decode([Segment.of(0, [int(p)], ids=np.array([tok], np.int32), outputs="last")])[0][-1])
        return torch.stack(out)
    finally:
        llama.clear(0)


def _prefix(got: list[int], expected: list[int]) -> int:
    """Tokens equal to the oracle's before the first difference."""
    k = 0
    while k < min(len(got), len(expected)) and got[k] == expected[k]:
        k += 1
    return k


def _next_token(address, prompt_ids: list[int]) -> int:
    """llama-server's greedy next token after `prompt_ids` (end of generation suppressed)."""
    conn = http.client.HTTPConnection(*address, timeout=300)
    try:
        conn.request("POST", "/completion", body=json.dumps({
            "prompt": prompt_ids, "n_predict": 1, "temperature": 0.0, "ignore_eos": True, "cache_prompt": True,
            "return_tokens": True}).encode(), headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    tokens = answer.get("tokens") or []
    if len(tokens) != 1:
        raise RuntimeError(f"llama-server answered {answer!r:.300}")
    return int(tokens[0])


def render(report: dict) -> str:
    n = report["tokens"]
    lines = [f"{report['checkpoint']}: teacher-forced argmax agreement with the fp32 oracle over {n} positions per "
             f"prompt (end ids suppressed); greedy prefix = tokens equal to the oracle's before the first difference",
             f"{'dtype':9} {'side':9} {'text TF agree':>14} {'image TF agree':>15} {'text greedy':>12} "
             f"{'image greedy':>13} {'max |dlogit|':>12}"]
    for dtype, sides in report["dtypes"].items():
        for side, rows in sides.items():
            text = [r for r in rows if not r["images"]]
            image = [r for r in rows if r["images"]]

            def frac(rs, key="agree"):
                have = [r for r in rs if key in r]
                if not have:
                    return "-"
                return f"{sum(r[key] for r in have)}/{sum(r['positions'] for r in have)}"

            diff = max((r.get("max_abs_logit_diff", float("nan")) for r in rows), default=float("nan"))
            lines.append(f"{dtype:9} {side:9} {frac(text):>14} {frac(image):>15} "
                         f"{frac(text, 'greedy_prefix'):>12} {frac(image, 'greedy_prefix'):>13} "
                         + (f"{diff:12.2e}" if side == "ours" else f"{'-':>12}"))
    f32 = report["dtypes"].get("float32", {}).get("ours", [])
    margins = [(r["prompt"], k, m) for r in f32 for k, m in r["disagreements"]]
    lines.append("float32 disagreements (prompt, position, oracle top-2 margin): "
                 + (", ".join(f"({p!r}, {k}, {m:.2e})" for p, k, m in margins) if margins else "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    from load_tests import run_tool

    sys.exit(run_tool(main))
