"""The Qwen3-VL-MoE language model for the CPU engine: weights, KV cache and one packed step.

A step advances many sequences at once: each contributes its new tokens (a prompt chunk or one
decoded token), all tokens are packed into one `[T, H]` batch for the projections, the MoE and
the norms, and only attention looks at sequences one by one (decode tokens of many sequences
share one batched attention call over the cache).

Inputs follow the TensorRT-LLM contract (DESIGN §3): ids `>= vocab_size` read rows of the
request's row-stacked prompt table, DeepStack level k is added after decoder layer k at those
tokens (`table.deepstack_row`), rotary angles of prompt tokens come from
`mrope_rotary_cos_sin`, decode tokens use `position + mrope_position_deltas`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ModelSpec, experts_out_in, iter_tensors, torch_dtype
from .table import deepstack_row, stride_of


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[T, d/2]` -> `[T, 1, d]` for `rotate`; built once per step, shared by every layer."""
    cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype)
    sin = torch.cat((sin, sin), dim=-1)[:, None, :].to(dtype)
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention. x `[T, heads, d]`, cos/sin `[T, 1, d]` (rotary_tables)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Up to this many rows, `linear` computes `(w @ x^T)^T`: for a handful of rows MKL's sgemm is
# slow on `x @ w^T` (about 11 GB/s of weights on the 2-core benchmark machine) and streams
# `w @ x^T` about twice as fast (20-36 GB/s). Decode steps and most experts' shares of a step
# are this small, and there the weights' bytes, not the FLOPs, set the time.
FEW_ROWS = 8


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), with the faster orientation for few rows."""
    rows = x.shape[0]
    if rows > FEW_ROWS:
        return F.linear(x, w, bias)
    if rows == 1:  # one row goes to MKL's gemv, half as fast as a two-column gemm: send it twice
        x = torch.cat((x, x))  # (x.repeat(2, 1) costs ~5 us more, ~8% of a batch-1 decode step)
    y = torch.mm(w, x.t())[:, :rows].t()
    return y if bias is None else y + bias


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # ((heads + 2 kv_heads) * d, H): q, k and v projections stacked, one matmul
    o: torch.Tensor  # (H, heads * d)
    q_norm: torch.Tensor  # (d,)
    k_norm: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    router: torch.Tensor | None = None  # (E, H)
    gate_up: torch.Tensor | None = None  # (E, 2I, H)
    down: torch.Tensor | None = None  # (E, H, I)
    mlp_gate: torch.Tensor | None = None  # dense layers: (I, H)
    mlp_up: torch.Tensor | None = None
    mlp_down: torch.Tensor | None = None  # (H, I)


class Weights:
    """The language model's tensors, read from `model.language_model.*` and `lm_head.weight`."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, tensors: dict[str, torch.Tensor] | None = None):
        """`tensors`: the checkpoint's tensors by their Hugging Face names (default: read from
        `spec.path`); a converted checkpoint can be mapped back to these names and checked here."""
        raw: dict[str, torch.Tensor] = {}
        source = tensors.items() if tensors is not None else iter_tensors(spec.path, "")
        for name, t in source:
            if name.startswith("model.language_model.") or name == "lm_head.weight":
                raw[name.removeprefix("model.language_model.")] = t
        if "embed_tokens.weight" not in raw:
            raise ValueError(f"{spec.path}: no model.language_model.embed_tokens.weight")

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = raw.pop(name, None)
            if t is None:
                if required:
                    raise ValueError(f"{spec.path}: tensor {name} is missing")
                return None
            return t.to(dtype).contiguous()

        self.embed = take("embed_tokens.weight")
        self.norm = take("norm.weight")
        head = raw.pop("lm_head.weight", None)
        self.lm_head = self.embed if (head is None and spec.tie_word_embeddings) else head.to(dtype).contiguous()
        self.layers: list[Layer] = []
        h, inter = spec.hidden_size, spec.moe_intermediate_size
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            a = p + "self_attn."
            biases = [take(a + f"{n}_proj.bias", False) for n in "qkv"]
            if any(b is not None for b in biases) and any(b is None for b in biases):
                raise ValueError(f"{spec.path}: layer {i} has a bias on some of q, k, v but not all")
            layer = Layer(
                input_norm=take(p + "input_layernorm.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                qkv=torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
                o=take(a + "o_proj.weight"),
                q_norm=take(a + "q_norm.weight"), k_norm=take(a + "k_norm.weight"),
                qkv_bias=None if biases[0] is None else torch.cat(biases),
                o_bias=take(a + "o_proj.bias", False),
            )
            if spec.is_moe_layer(i):
                layer.router = take(p + "mlp.gate.weight")
                # [E, out, in] for F.linear, from the hub's [E, in, out] or transformers' layout
                gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
                gate_up = experts_out_in(take(gate_up), 2 * inter, h, gate_up)
                down = experts_out_in(take(down), h, inter, down)
                layer.gate_up, layer.down = gate_up.contiguous(), down.contiguous()
            else:
                layer.mlp_gate = take(p + "mlp.gate_proj.weight")
                layer.mlp_up = take(p + "mlp.up_proj.weight")
                layer.mlp_down = take(p + "mlp.down_proj.weight")
            self.layers.append(layer)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages are committed only when written, so unused capacity costs no RAM.

    Zero, not torch.empty: batched decode attends over every slot up to the longest sequence and
    masks the positions a shorter one has not written, but a masked position's V row is still
    multiplied by 0, and a NaN the allocator's memory held there made the whole output NaN.
    torch.zeros would write every page; calloc (numpy's zeros) gets a large block as a fresh
    mapping, which the kernel zero-fills on first touch."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).reshape(shape)


class KVCache:
    """Per-layer K and V `[slots, kv_heads, max_len, d]`; a sequence owns one slot."""

    def __init__(self, spec: ModelSpec, slots: int, max_len: int, dtype: torch.dtype):
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [zeroed(shape, dtype) for _ in range(spec.num_layers)]
        self.v = [zeroed(shape, dtype) for _ in range(spec.num_layers)]
        self.slots = slots
        self.max_len = max_len

    def move(self, src: int, dst: int, length: int) -> None:
        for kv in (self.k, self.v):
            for layer in kv:
                layer[dst, :, :length] = layer[src, :, :length]


@dataclass
class StepSeq:
    """One sequence's share of a step."""

    slot: int
    ids: torch.Tensor  # (n,) int64 new tokens
    past: int  # tokens of this sequence already in the cache
    cos: torch.Tensor  # (n, d/2) rotary angles of the new tokens
    sin: torch.Tensor
    table: torch.Tensor | None = None  # (rows, H) prompt table
    all_logits: bool = False  # logits for every new token, not just the last
    ds_index: torch.Tensor | None = field(default=None, repr=False)


class LanguageModel:
    def __init__(self, spec: ModelSpec, dtype: str = "float32", slots: int = 8, max_len: int = 4096,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.spec = spec
        self.dtype = torch_dtype(dtype)
        self.w = Weights(spec, self.dtype, tensors)
        self.cache = KVCache(spec, slots, max_len, self.dtype)
        self.levels = spec.deepstack_levels

    # -- embedding and DeepStack gather ------------------------------------------------------
    def _embed(self, batch: list[StepSeq]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Packed input embeddings `[T, H]` and the DeepStack (token index, rows `[levels, m, H]`)."""
        vocab = self.spec.vocab_size
        ids = torch.cat([s.ids for s in batch])
        hidden = torch.empty((ids.numel(), self.spec.hidden_size), dtype=self.dtype)
        text = ids < vocab
        hidden[text] = self.w.embed[ids[text]]
        ds_index, ds_rows, offset = [], [], 0
        for s in batch:
            fake = s.ids >= vocab
            if bool(fake.any()):
                stride = stride_of(s.table.shape[0], self.levels)
                at = torch.nonzero(fake).reshape(-1)
                hidden[offset + at] = s.table[s.ids[at] - vocab].to(self.dtype)
                ds_index.append(offset + at)
                rows = torch.stack([deepstack_row(s.ids[at], vocab, stride, k) for k in range(self.levels)])
                ds_rows.append(s.table[rows].to(self.dtype))  # (levels, m, H)
            offset += s.ids.numel()
        if not ds_index:
            return hidden, None, None
        return hidden, torch.cat(ds_index), torch.cat(ds_rows, dim=1)

    # -- blocks ----------------------------------------------------------------------------------
    def _attention(self, i: int, x: torch.Tensor, batch: list[StepSeq], cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        spec, layer = self.spec, self.w.layers[i]
        t = x.shape[0]
        d = spec.head_dim
        qkv = linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d], dim=-1)
        q = rotate(rms_norm(q.reshape(t, spec.num_heads, d), layer.q_norm, spec.rms_norm_eps), cos, sin)
        k = rotate(rms_norm(k.reshape(t, spec.num_kv_heads, d), layer.k_norm, spec.rms_norm_eps), cos, sin)
        v = v.reshape(t, spec.num_kv_heads, d)
        kc, vc = self.cache.k[i], self.cache.v[i]
        out = torch.empty((t, spec.num_heads, d), dtype=self.dtype)
        decode, offset = [], 0
        for s in batch:
            n = s.ids.numel()
            if n == 1:
                decode.append((offset, s))
            else:
                kc[s.slot, :, s.past:s.past + n] = k[offset:offset + n].transpose(0, 1)
                vc[s.slot, :, s.past:s.past + n] = v[offset:offset + n].transpose(0, 1)
                qs = q[offset:offset + n].transpose(0, 1)[None]  # (1, heads, n, d)
                ks = kc[s.slot, :, :s.past + n][None]  # (1, kv_heads, past + n, d)
                vs = vc[s.slot, :, :s.past + n][None]
                if s.past == 0:
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                else:
                    mask = torch.arange(s.past + n)[None, :] <= (s.past + torch.arange(n))[:, None]
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
                out[offset:offset + n] = o[0].transpose(0, 1)
            offset += n
        if decode:
            self._decode_attention(decode, q, k, v, kc, vc, out)
        return linear(out.view(t, -1), layer.o, layer.o_bias)

    def _decode_attention(self, decode, q, k, v, kc, vc, out) -> None:
        """All single-token sequences at once: one cache write and one attention call over their slots."""
        spec = self.spec
        slots = [s.slot for _, s in decode]
        pos = torch.tensor([s.past for _, s in decode])
        rows = torch.tensor([o for o, _ in decode])
        slot_index = torch.tensor(slots)[:, None]
        heads = torch.arange(spec.num_kv_heads)[None, :]
        kc[slot_index, heads, pos[:, None]] = k[rows]  # (B, kv_heads, d), each at its sequence's position
        vc[slot_index, heads, pos[:, None]] = v[rows]
        longest = int(pos.max()) + 1
        if slots == list(range(slots[0], slots[0] + len(slots))):  # contiguous: a view, no copy
            ks = kc[slots[0]:slots[0] + len(slots), :, :longest]
            vs = vc[slots[0]:slots[0] + len(slots), :, :longest]
        else:
            ks, vs = kc[slot_index[:, 0], :, :longest], vc[slot_index[:, 0], :, :longest]
        mask = (torch.arange(longest)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        o = F.scaled_dot_product_attention(q[rows][:, :, None, :], ks, vs, attn_mask=mask, enable_gqa=True)
        out[rows] = o[:, :, 0, :]

    def _moe(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        top_k = self.spec.experts_per_token
        probs = torch.softmax(linear(x, layer.router), dim=-1, dtype=torch.float)  # (T, E)
        weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype).reshape(-1)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # the (T, k) choices grouped by expert
        counts = torch.bincount(flat, minlength=layer.router.shape[0]).tolist()
        tokens = order // top_k
        xs = x[tokens]  # (T * k, H): each token once per expert that chose it, grouped by expert
        ys, start = [], 0
        for e, c in enumerate(counts):
            if not c:
                continue
            gate, up = linear(xs[start:start + c], layer.gate_up[e]).chunk(2, dim=-1)
            ys.append(linear(F.silu(gate) * up, layer.down[e]))
            start += c
        y = torch.cat(ys) * weights[order, None]
        # one scatter-add in expert order: each token sums its experts in the same order as before
        return torch.zeros_like(x).index_add_(0, tokens, y)

    @staticmethod
    def _dense(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, layer.mlp_gate)) * linear(x, layer.mlp_up), layer.mlp_down)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: list[StepSeq]) -> list[torch.Tensor]:
        """Run one packed step; return per sequence the logits `[n or 1, vocab]` (float32)."""
        spec = self.spec
        for s in batch:
            if s.past + s.ids.numel() > self.cache.max_len:
                raise ValueError(f"sequence in slot {s.slot} exceeds the cache length {self.cache.max_len}")
        h, ds_index, ds_rows = self._embed(batch)
        cos, sin = rotary_tables(torch.cat([s.cos for s in batch]), torch.cat([s.sin for s in batch]), self.dtype)
        for i, layer in enumerate(self.w.layers):
            h = h + self._attention(i, rms_norm(h, layer.input_norm, spec.rms_norm_eps), batch, cos, sin)
            x = rms_norm(h, layer.post_norm, spec.rms_norm_eps)
            h = h + (self._moe(layer, x) if layer.router is not None else self._dense(layer, x))
            if ds_index is not None and i < self.levels:
                h[ds_index] += ds_rows[i]
        picks, offset = [], 0
        for s in batch:
            n = s.ids.numel()
            picks.append(torch.arange(offset, offset + n) if s.all_logits else torch.tensor([offset + n - 1]))
            offset += n
        sel = torch.cat(picks)
        logits = linear(rms_norm(h[sel], self.w.norm, spec.rms_norm_eps), self.w.lm_head).float()
        return list(logits.split([p.numel() for p in picks]))
