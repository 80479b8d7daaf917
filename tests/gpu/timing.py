"""The DeepstackAdd kernel's cost against one Qwen3-VL-30B-A3B decoder layer (part 2 of
tests/gpu/device_check.sh).

The layer is real torch work in bfloat16 with random weights, sized as Qwen3-VL-30B-A3B's text
model: hidden 2048, 32 query heads and 4 KV heads of 128, RMSNorm on q and k, rotary embedding,
SDPA attention, then a MoE of 128 experts, top 8, intermediate 768, routed with
torch._grouped_mm (an expert loop where that is missing). Two steps are timed:

- prefill: one sequence of `prefill_tokens` tokens, causal attention, every token an image token
  for the add (the most rows it can touch);
- decode: `decode_batch` sequences of one new token each, attending over `decode_context` cached
  positions; no image token (decode tokens are text), so the add copies the rows.

Each is timed with CUDA events: warm-up, then the median of `reps` timings of `inner` back-to-back
runs. The kernel is also timed inside a CUDA graph (launch overhead out), and a device-to-device
copy gives the bandwidth ceiling the kernel's bytes are set against. The ratio reported is kernel
time / layer time; the model adds DeepStack after 3 of its 48 layers.

    python -m tests.gpu.timing --lib LIB --report timing.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerShape:
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 128
    top_k: int = 8
    moe_intermediate: int = 768
    layers: int = 48
    deepstack_layers: int = 3
    eps: float = 1e-6


QWEN3_VL_30B_A3B = LayerShape()


def rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def grouped_mm_available(device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
        b = torch.randn(2, 64, 32, device=device, dtype=torch.bfloat16)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        want = torch.cat([a[:16] @ b[0], a[16:] @ b[1]])
        got = torch._grouped_mm(a, b, offs=offs)
        return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-1))
    except Exception:  # noqa: BLE001 -- an unsupported device or build: the loop is used
        return False


class DecoderLayer:
    """One MoE decoder layer (Qwen3-MoE style) with random weights; `prefill` and `decode` return
    the new hidden states. `grouped` picks torch._grouped_mm for the experts, else a loop."""

    def __init__(self, shape: LayerShape = QWEN3_VL_30B_A3B, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                 grouped: bool | None = None):
        g = torch.Generator(device=device).manual_seed(seed)
        s = self.shape = shape
        self.device, self.dtype = device, dtype

        def w(*size, scale=None):
            scale = scale or 1.0 / math.sqrt(size[-2] if len(size) > 1 else size[-1])
            return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.w_qkv = w(s.hidden, qkv)
        self.w_o = w(s.heads * s.head_dim, s.hidden)
        self.q_norm = torch.ones(s.head_dim, device=device, dtype=dtype)
        self.k_norm = torch.ones(s.head_dim, device=device, dtype=dtype)
        self.input_norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.post_norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.w_router = w(s.hidden, s.experts)
        self.w_gate_up = w(s.experts, s.hidden, 2 * s.moe_intermediate)
        self.w_down = w(s.experts, s.moe_intermediate, s.hidden)
        self.grouped = grouped_mm_available(device) if grouped is None else grouped

    # -- pieces ------------------------------------------------------------------------------------
    def rope(self, positions):
        s = self.shape
        inv = 1.0 / (1_000_000 ** (torch.arange(0, s.head_dim, 2, device=self.device).float() / s.head_dim))
        freqs = positions.float()[:, None] * inv[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def qkv(self, x, cos, sin):
        s = self.shape
        t = x.shape[0]
        qkv = rms_norm(x, self.input_norm, s.eps) @ self.w_qkv
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q = rotate(rms_norm(q.view(t, s.heads, s.head_dim), self.q_norm, s.eps), cos[:, None], sin[:, None])
        k = rotate(rms_norm(k.view(t, s.kv_heads, s.head_dim), self.k_norm, s.eps), cos[:, None], sin[:, None])
        return q, k, v.view(t, s.kv_heads, s.head_dim)

    def moe(self, x):
        """x [T, H] -> routed experts' sum [T, H] (softmax over experts, top k, renormalised)."""
        s = self.shape
        h = rms_norm(x, self.post_norm, s.eps)
        probs = torch.softmax((h @ self.w_router).float(), dim=-1)
        weight, expert = probs.topk(s.top_k, dim=-1)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        flat = expert.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // s.top_k
        counts = torch.bincount(flat, minlength=s.experts)
        rows = h[token]
        if self.grouped:
            offs = counts.cumsum(0).to(torch.int32)
            gate_up = torch._grouped_mm(rows, self.w_gate_up, offs=offs)
            gate, up = gate_up.chunk(2, dim=-1)
            down = torch._grouped_mm(F.silu(gate) * up, self.w_down, offs=offs)
        else:
            down = torch.empty_like(rows)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    gate, up = (rows[start:start + n] @ self.w_gate_up[e]).chunk(2, dim=-1)
                    down[start:start + n] = (F.silu(gate) * up) @ self.w_down[e]
                start += n
        down = down * weight.reshape(-1)[order][:, None]
        return torch.zeros_like(x).index_add_(0, token, down)

    # -- steps -------------------------------------------------------------------------------------
    def prefill(self, x):
        """One sequence: x [T, H], causal attention over itself."""
        s = self.shape
        t = x.shape[0]
        cos, sin = self.rope(torch.arange(t, device=self.device))
        q, k, v = self.qkv(x, cos, sin)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        x = x + attn[0].transpose(0, 1).reshape(t, s.heads * s.head_dim) @ self.w_o
        return x + self.moe(x)

    def decode(self, x, k_cache, v_cache):
        """A batch of one new token per sequence: x [B, H]; caches [B, kv_heads, context, head_dim]
        (the new token's key and value are written at the last position)."""
        s = self.shape
        b, context = x.shape[0], k_cache.shape[2]
        cos, sin = self.rope(torch.full((b,), context - 1, device=self.device))
        q, k, v = self.qkv(x, cos, sin)
        k_cache[:, :, -1] = k
        v_cache[:, :, -1] = v
        attn = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, enable_gqa=True)
        x = x + attn.reshape(b, s.heads * s.head_dim) @ self.w_o
        return x + self.moe(x)


def time_ms(fn, warmup: int = 3, reps: int = 9, inner: int = 1) -> dict:
    """Median (and min, max) of `reps` CUDA-event timings of `inner` back-to-back calls, per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "inner": inner}


def graph_time_ms(fn, launches: int = 100, reps: int = 9) -> dict:
    """fn launched `launches` times inside one CUDA graph, replayed: per-launch time without the
    CPU's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    r = time_ms(graph.replay, warmup=2, reps=reps)
    return {k: (v / launches if k.endswith("_ms") else v) for k, v in r.items()} | {"launches_per_graph": launches}


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    r = time_ms(lambda: b.copy_(a), warmup=2, reps=7)
    return 2 * nbytes / (r["median_ms"] * 1e-3) / 1e9


def kernel_inputs(tokens: int, hidden: int, image_tokens: int, stride: int, dtype=torch.bfloat16, vocab=151936,
                  levels: int = 3):
    """One request's step: `image_tokens` of the tokens are its fake ids (the rest text), one slot."""
    p = (levels + 1) * stride
    ids = torch.randint(0, vocab, (tokens,), dtype=torch.int32)
    ids[:image_tokens] = vocab + torch.arange(image_tokens, dtype=torch.int32)
    x = torch.randn(tokens, hidden).to(dtype).cuda()
    table = torch.randn(p, hidden).to(dtype).cuda()
    tasks = torch.zeros(tokens, dtype=torch.int32, device="cuda")
    pvs = torch.tensor([p], dtype=torch.int32, device="cuda")
    return x, ids.cuda(), tasks, table, pvs, p


def run(lib: str | None, report: str | None, prefill_tokens: int = 4096, decode_batch: int = 64,
        decode_context: int = 2048) -> int:
    from tests.gpu.report import Part

    with Part("timing", report) as part:
        if not torch.cuda.is_available():
            part.skip("torch sees no CUDA device")
            return part.finish()
        shape = QWEN3_VL_30B_A3B
        f = part.figures
        f["device"] = torch.cuda.get_device_name()
        f["copy_bandwidth_GBps"] = round(copy_bandwidth_gbs())
        part.log(f"device-to-device copy: {f['copy_bandwidth_GBps']} GB/s (read + written)")
        layer = DecoderLayer(shape)
        f["moe_impl"] = "torch._grouped_mm" if layer.grouped else "expert loop"
        g = torch.Generator(device="cpu").manual_seed(1)
        x_prefill = torch.randn(prefill_tokens, shape.hidden, generator=g).to("cuda", torch.bfloat16)
        x_decode = torch.randn(decode_batch, shape.hidden, generator=g).to("cuda", torch.bfloat16)
        cache = [torch.randn(decode_batch, shape.kv_heads, decode_context, shape.head_dim, generator=g)
                 .to("cuda", torch.bfloat16) for _ in range(2)]
        with torch.inference_mode():
            if layer.grouped:
                try:  # the real shapes once: a grouped GEMM this build refuses falls back to the loop
                    layer.prefill(x_prefill[:64])
                    layer.decode(x_decode, *cache)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 -- reported; the loop times the same layer
                    layer.grouped = False
                    f["moe_impl"] = f"expert loop (torch._grouped_mm failed: {type(exc).__name__}: {exc})"[:300]
            layer_prefill = time_ms(lambda: layer.prefill(x_prefill), warmup=3, reps=9)
            part.log(f"layer prefill {prefill_tokens} tokens: {layer_prefill['median_ms']:.3f} ms")
            layer_decode = time_ms(lambda: layer.decode(x_decode, *cache), warmup=3, reps=9, inner=5)
            part.log(f"layer decode batch {decode_batch} (context {decode_context}): "
                     f"{layer_decode['median_ms']:.3f} ms")
        f["layer"] = {"prefill": layer_prefill, "decode": layer_decode, "prefill_tokens": prefill_tokens,
                      "decode_batch": decode_batch, "decode_context": decode_context, "shape": vars(shape)}
        f["layer_prefill_ms"] = round(layer_prefill["median_ms"], 4)
        f["layer_decode_ms"] = round(layer_decode["median_ms"], 4)
        cache = layer = None  # free the layer's GPU memory before the next part
        torch.cuda.empty_cache()

        if lib is None:
            part.fail("the kernel library was not built: only the layer was timed")
            return part.finish()
        from tests.gpu.deepstack_gpu import Kernel, reference

        kernel = Kernel(lib)
        for step, tokens, image in (("prefill", prefill_tokens, prefill_tokens), ("decode", decode_batch, 0)):
            x, ids, tasks, table, pvs, p = kernel_inputs(tokens, shape.hidden, image, max(image, 1))
            out = torch.empty_like(x)
            got = kernel.add(x, ids, tasks, table, pvs, 151936, 3, 0, out=out)
            torch.cuda.synchronize()
            part.check(f"{step}: the timed launch computes the reference", torch.equal(
                got, reference(x, ids, tasks, table, p, 151936, 3, 0)))

            def launch():
                code = kernel.launch(out, x, ids, tasks, table, pvs, 151936, 3, 0)
                if code:
                    raise RuntimeError(f"launch failed: {kernel.error_name(code)}")

            stream_t = time_ms(launch, warmup=10, reps=15, inner=50)
            try:
                graph_t = graph_time_ms(launch)
            except Exception as exc:  # noqa: BLE001 -- reported, the stream timing stands
                graph_t = {"error": f"{type(exc).__name__}: {exc}"}
            layer_ms = (layer_prefill if step == "prefill" else layer_decode)["median_ms"]
            kernel_ms = graph_t.get("median_ms", stream_t["median_ms"])
            moved = 2 * x.numel() * x.element_size() + image * shape.hidden * x.element_size()
            ratio = kernel_ms / layer_ms
            per_forward = shape.deepstack_layers * kernel_ms / (shape.layers * layer_ms)
            f[f"kernel_{step}"] = {"stream": stream_t, "graph": graph_t, "tokens": tokens, "image_tokens": image,
                                   "bytes": moved}
            f[f"kernel_{step}_us"] = round(kernel_ms * 1e3, 2)
            f[f"kernel_{step}_GBps"] = round(moved / (kernel_ms * 1e-3) / 1e9)
            f[f"ratio_{step}_percent"] = round(100 * ratio, 3)
            f[f"ratio_{step}_per_forward_percent"] = round(100 * per_forward, 4)
            part.check(f"{step}: kernel under 1% of a layer", ratio < 0.01,
                       f"kernel {kernel_ms * 1e3:.2f} us ({f[f'kernel_{step}_GBps']} GB/s), layer "
                       f"{layer_ms:.3f} ms: {100 * ratio:.3f}% of a layer, {100 * per_forward:.4f}% of a forward "
                       f"pass ({shape.deepstack_layers} adds, {shape.layers} layers)")
    return part.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib")
    ap.add_argument("--report")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=2048)
    args = ap.parse_args(argv)
    return run(args.lib, args.report, args.prefill_tokens, args.decode_batch, args.decode_context)


if __name__ == "__main__":
    raise SystemExit(main())
