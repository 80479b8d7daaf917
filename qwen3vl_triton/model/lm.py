"""The Qwen3-VL-MoE language model for the CPU engine: weights, KV cache and one packed step.

A step advances many sequences at once: each contributes its new tokens (a prompt chunk or one
decoded token), all tokens are packed into one `[T, H]` batch for the projections, the MoE and
the norms, and only attention looks at sequences one by one (decode tokens of many sequences
share one batched attention call over the cache).

The step is built from few, large kernels: q, k and v come from one matmul, the q and k norms
and the rotary embedding run once over both, the experts run as two grouped matmuls over the
(token, expert) pairs sorted by expert (`F.grouped_mm`, as transformers' own default), and
everything that depends only on the batch's shape (rotary angles, cache indices, masks) is built
once per step (`Step`) and shared by every layer.

Inputs follow the TensorRT-LLM contract (docs/design.md §3): ids `>= vocab_size` read rows of the
request's row-stacked prompt table, DeepStack level k is added after decoder layer k at those
tokens (`table.deepstack_row`), rotary angles of prompt tokens come from
`mrope_rotary_cos_sin`, decode tokens use `position + mrope_position_deltas`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import ModelSpec, experts_out_in, iter_tensors, torch_dtype
from qwen3vl_triton.model.table import deepstack_row, stride_of


def warn_if_slow_bf16(dtype: torch.dtype, what: str) -> None:
    """bfloat16 pays on CPUs with bf16 matmul instructions (AVX512-BF16, AMX): half the bytes of
    float32 and several times its matmul rate. Without them torch falls back to a generic kernel
    that runs matmuls far slower than float32, so say so once at load."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if dtype == torch.bfloat16 and check is not None and not check():
        warnings.warn(f"{what} runs bfloat16 on a CPU without bf16 matmul instructions (AVX512-BF16 or "
                      f"AMX): its matmuls run far slower than in float32 here", RuntimeWarning, stacklevel=2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm, transformers' arithmetic in five ops (F.rms_norm runs ten on CPU):
    normalised in float32, then scaled by `weight` in the input's dtype. `weight` broadcasts over
    trailing dims."""
    h = x.float()
    scale = h.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (h * scale).to(x.dtype).mul_(weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) in three ops. x `[T, heads, d]`, cos and sin
    `[T, 1, d]` from `Step`: sin's first half is negated, so rotate_half(x) * sin(angles) equals
    roll(x, d/2) * sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # ((heads + 2 kv_heads) * d, H): q, k and v projections stacked, one matmul
    qk_norm: torch.Tensor  # (heads + kv_heads, d): q_norm for every q head, then k_norm for every k head
    o: torch.Tensor  # (H, heads * d)
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    router: torch.Tensor | None = None  # (E, H)
    gate_up: torch.Tensor | None = None  # (E, H, 2I): x @ gate_up[e] -> gate | up
    down: torch.Tensor | None = None  # (E, I, H)
    mlp_gate_up: torch.Tensor | None = None  # dense layers: (2I, H), rows gate | up
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
            q_norm, k_norm = take(a + "q_norm.weight"), take(a + "k_norm.weight")
            layer = Layer(
                input_norm=take(p + "input_layernorm.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                qkv=torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
                qk_norm=torch.cat([q_norm.expand(spec.num_heads, -1), k_norm.expand(spec.num_kv_heads, -1)]),
                o=take(a + "o_proj.weight"),
                qkv_bias=None if biases[0] is None else torch.cat(biases),
                o_bias=take(a + "o_proj.bias", False),
            )
            if spec.is_moe_layer(i):
                layer.router = take(p + "mlp.gate.weight")
                # Checkpoints hold fused experts as [E, in, out] (the hub's files) or [E, out, in]
                # (transformers' own save), told apart by transformers' rule (experts_out_in); the
                # engine keeps [E, in, out], rows of the input dimension, which both expert kernels
                # below read as they are.
                gate_up, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
                gate_up = experts_out_in(take(gate_up), 2 * inter, h, gate_up).transpose(1, 2).contiguous()
                down = experts_out_in(take(down), h, inter, down).transpose(1, 2).contiguous()
                layer.gate_up, layer.down = gate_up, down
            else:
                layer.mlp_gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
                layer.mlp_down = take(p + "mlp.down_proj.weight")
            self.layers.append(layer)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages are committed only when written, so unused capacity costs no RAM.

    torch.zeros would write every page; calloc (numpy's zeros) gets a large block as a fresh
    mapping, which the kernel zero-fills on first touch."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, np.uint8)).view(dtype).reshape(shape)


class KVCache:
    """Per-layer K and V `[slots, kv_heads, max_len, d]`; a sequence owns one slot.

    A slot's rows past its sequence's length may hold anything: an earlier sequence's values,
    NaN or Inf. Batched decode attends over every slot of the group up to the longest sequence
    and masks the positions a shorter one has not written, but a masked position still enters
    the sums as 0 * value, and 0 * NaN is NaN: one sequence's numbers would reach another. So
    before a decode step reads rows past a sequence's length, they are zeroed (`clear_ahead`,
    a block of rows at a time, once per occupancy), and attention never reads a row that is
    neither written by its own sequence nor zero.
    """

    CLEAR_BLOCK = 128  # rows zeroed ahead at once: a growing batch clears once per this many steps

    def __init__(self, spec: ModelSpec, slots: int, max_len: int, dtype: torch.dtype):
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [zeroed(shape, dtype) for _ in range(spec.num_layers)]
        self.v = [zeroed(shape, dtype) for _ in range(spec.num_layers)]
        self.slots = slots
        self.max_len = max_len
        # per slot: rows [0, written) belong to its sequence, rows [written, clean) are zero
        self.written = [0] * slots
        self.clean = [0] * slots

    def claim(self, slot: int) -> None:
        """A new sequence takes the slot: nothing in it is its own, nothing is known zero."""
        self.written[slot] = self.clean[slot] = 0

    def clear_ahead(self, slot: int, end: int) -> None:
        """Make every row of the slot in [its sequence's length, end) zero."""
        if self.clean[slot] >= end:
            return
        lo, hi = max(self.written[slot], self.clean[slot]), min(self.max_len, end + self.CLEAR_BLOCK)
        for layer in (*self.k, *self.v):
            layer[slot, :, lo:hi].zero_()
        self.clean[slot] = hi

    def move(self, src: int, dst: int) -> None:
        """Move a sequence from slot `src` to the free slot `dst`."""
        n = self.written[src]
        for layer in (*self.k, *self.v):
            layer[dst, :, :n] = layer[src, :, :n]
        self.written[dst] = self.clean[dst] = n


@dataclass
class StepSeq:
    """One sequence's share of a step."""

    slot: int
    ids: torch.Tensor  # (n,) int64 new tokens
    past: int  # tokens of this sequence already in the cache
    cos: torch.Tensor | None = None  # (n, d/2) rotary angles of the new tokens (prompt: from M-RoPE)
    sin: torch.Tensor | None = None  # None: text positions past + delta + i on all three M-RoPE rows
    table: torch.Tensor | None = None  # (rows, H) prompt table
    all_logits: bool = False  # logits for every new token, not just the last
    delta: int = 0  # mrope_position_deltas, for tokens without cos/sin


class Step:
    """What every layer of one step shares, built once from the batch: packed ids, rotary
    tables, cache write indices, the decode group's slots and mask, and the prefill chunks."""

    def __init__(self, lm: "LanguageModel", batch: list[StepSeq]):
        spec, cache = lm.spec, lm.cache
        sizes = [s.ids.numel() for s in batch]
        self.ids = batch[0].ids if len(batch) == 1 else torch.cat([s.ids for s in batch])
        # rotary: angles of prompt tokens come with the sequence, the others from their position
        if all(s.cos is None for s in batch):
            pos = np.concatenate([np.arange(s.past, s.past + n) + s.delta for s, n in zip(batch, sizes)])
            ang = torch.from_numpy(pos)[:, None].float() * lm.inv_freq
            cos, sin = ang.cos(), ang.sin()
        else:
            parts = [(s.cos, s.sin) if s.cos is not None else
                     mrope.text_cos_sin(torch.arange(s.past, s.past + n) + s.delta, spec)
                     for s, n in zip(batch, sizes)]
            cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        self.cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(lm.dtype)
        self.sin = torch.cat((-sin, sin), dim=-1)[:, None, :].to(lm.dtype)
        # cache writes: row (slot, head, position) of every new token's k and v, one index_copy
        kv, length = spec.num_kv_heads, cache.max_len
        slot_t = np.repeat([s.slot for s in batch], sizes)
        pos_t = np.concatenate([np.arange(s.past, s.past + n) for s, n in zip(batch, sizes)])
        rows = (slot_t[:, None] * kv + np.arange(kv)) * length + pos_t[:, None]  # (T, kv)
        self.cache_rows = torch.from_numpy(rows.reshape(-1))
        # decode group: one token each, one attention call over their slots
        offsets = np.cumsum([0] + sizes)
        decode = [i for i, n in enumerate(sizes) if n == 1]
        self.all_decode = len(decode) == len(batch)
        self.decode_rows = None if self.all_decode else torch.tensor([int(offsets[i]) for i in decode])
        self.decode_slots: slice | torch.Tensor | None = None
        self.decode_mask = None
        if decode:
            slots = [batch[i].slot for i in decode]
            lengths = [batch[i].past + 1 for i in decode]
            self.decode_len = max(lengths)
            if slots == list(range(slots[0], slots[0] + len(slots))):  # contiguous: a view, no copy
                self.decode_slots = slice(slots[0], slots[0] + len(slots))
            else:
                self.decode_slots = torch.tensor(slots)
            if min(lengths) != self.decode_len:
                self.decode_mask = (torch.arange(self.decode_len) < torch.tensor(lengths)[:, None])[:, None, None, :]
                for slot in slots:  # the rows a shorter sequence reads past its own are zero
                    cache.clear_ahead(slot, self.decode_len)
        for s, n in zip(batch, sizes):  # the rows this step writes
            cache.written[s.slot] = max(cache.written[s.slot], s.past + n)
        # prefill chunks: (offset, n, slot, past, mask or None for causal from position 0)
        self.prefill = []
        for i, (s, n) in enumerate(zip(batch, sizes)):
            if n > 1:
                mask = None if s.past == 0 else \
                    torch.arange(s.past + n)[None, :] <= (s.past + torch.arange(n))[:, None]
                self.prefill.append((int(offsets[i]), n, s.slot, s.past, mask))
        # rows whose logits are returned
        self.pick_sizes = [n if s.all_logits else 1 for s, n in zip(batch, sizes)]
        if self.all_decode or all(s.all_logits for s in batch):
            self.picks = None
        else:
            self.picks = torch.tensor([j for s, n, o in zip(batch, sizes, offsets)
                                       for j in (range(o, o + n) if s.all_logits else (o + n - 1,))])


class LanguageModel:
    def __init__(self, spec: ModelSpec, dtype: str = "float32", slots: int = 8, max_len: int = 4096,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.spec = spec
        self.dtype = torch_dtype(dtype)
        warn_if_slow_bf16(self.dtype, "the language model")
        self.w = Weights(spec, self.dtype, tensors)
        self.cache = KVCache(spec, slots, max_len, self.dtype)
        self.levels = spec.deepstack_levels
        self.inv_freq = mrope.inv_freq(spec)
        # index pieces of `_expert_rows`: the rows of one expert, and where each pair's bag starts
        h, i, e = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
        self._rows_h, self._rows_i = torch.arange(h), torch.arange(i)
        self._bags_h, self._bags_i = torch.arange(0, e * h, h), torch.arange(0, e * i, i)

    # -- embedding and DeepStack gather ------------------------------------------------------
    def _embed(
        self, batch: list[StepSeq], ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Packed input embeddings `[T, H]` and the DeepStack (token index, rows `[levels, m, H]`)."""
        vocab = self.spec.vocab_size
        text = ids < vocab
        if bool(text.all()):  # no image token: decode steps, text prompts
            return F.embedding(ids, self.w.embed), None, None
        hidden = torch.empty((ids.numel(), self.spec.hidden_size), dtype=self.dtype)
        hidden[text] = self.w.embed[ids[text]]
        ds_index, ds_rows, offset = [], [], 0
        for s in batch:
            fake = s.ids >= vocab
            if s.table is not None and bool(fake.any()):
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
    def _attention(self, i: int, x: torch.Tensor, step: Step) -> torch.Tensor:
        spec, layer = self.spec, self.w.layers[i]
        t, d, heads, kv = x.shape[0], spec.head_dim, spec.num_heads, spec.num_kv_heads
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # (T, (heads + 2 kv) d)
        qk = qkv[:, :(heads + kv) * d].unflatten(-1, (heads + kv, d))
        qk = rotate(rms_norm(qk, layer.qk_norm, spec.rms_norm_eps), step.cos, step.sin)  # (T, heads + kv, d)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, (heads + kv) * d:].view(t, kv, d)
        kc, vc = self.cache.k[i], self.cache.v[i]
        kc.view(-1, d).index_copy_(0, step.cache_rows, k.reshape(-1, d))
        vc.view(-1, d).index_copy_(0, step.cache_rows, v.reshape(-1, d))
        if step.all_decode:  # (B, heads, 1, d) over the cache rows of B slots
            out = self._decode_attention(q, kc, vc, step).view(t, heads * d)
        else:
            out = torch.empty((t, heads, d), dtype=self.dtype)
            if step.decode_slots is not None:
                out[step.decode_rows] = self._decode_attention(q[step.decode_rows], kc, vc, step)
            for offset, n, slot, past, mask in step.prefill:
                qs = q[offset:offset + n].transpose(0, 1)[None]  # (1, heads, n, d)
                ks, vs = kc[slot:slot + 1, :, :past + n], vc[slot:slot + 1, :, :past + n]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                   enable_gqa=True)
                out[offset:offset + n] = o[0].transpose(0, 1)
            out = out.view(t, heads * d)
        return F.linear(out, layer.o, layer.o_bias)

    @staticmethod
    def _decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, step: Step) -> torch.Tensor:
        """All single-token sequences at once: q `(B, heads, d)` -> `(B, heads, d)`."""
        ks, vs = kc[step.decode_slots, :, :step.decode_len], vc[step.decode_slots, :, :step.decode_len]
        o = F.scaled_dot_product_attention(q[:, :, None, :], ks, vs, attn_mask=step.decode_mask, enable_gqa=True)
        return o[:, :, 0, :]

    def _moe(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """Top-k experts of every token, summed with their routing weights in top-k order (as
        transformers sums them). The (token, expert) pairs run in one of two kernels, each a
        single call for all pairs whatever the number of experts:
        - few pairs (a decode step: at most one pair per expert): each pair's product is a
          weighted sum of its expert's weight rows, which `F.embedding_bag` computes reading
          exactly the chosen experts' rows, once;
        - more pairs than experts (prompts): the pairs sorted by expert and two grouped matmuls
          (`F.grouped_mm`, transformers' default experts kernel), each expert's rows read once
          for all its tokens."""
        t, top_k = x.shape[0], self.spec.experts_per_token
        probs = torch.softmax(F.linear(x, layer.router), dim=-1, dtype=torch.float)  # (T, E)
        weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        pairs = experts.view(-1)  # (T k,) in token order
        if pairs.numel() <= self.spec.num_experts:
            y = self._expert_rows(layer, x, pairs)
        else:
            y = self._expert_groups(layer, x, pairs)
        return (y * weights.view(-1, 1)).view(t, top_k, -1).sum(dim=1)

    def _expert_rows(self, layer: Layer, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """`(T k, H)`: x[token] @ gate_up[e], then @ down[e], for each pair as bags of weight rows."""
        n, (_experts, hidden, inter2) = pairs.numel(), layer.gate_up.shape
        rows = (pairs[:, None] * hidden + self._rows_h).view(-1)
        scale = x.repeat_interleave(self.spec.experts_per_token, dim=0).view(-1)
        h = F.embedding_bag(rows, layer.gate_up.view(-1, inter2), self._bags_h[:n], mode="sum",
                            per_sample_weights=scale)  # (T k, 2I)
        gate, up = h.chunk(2, dim=-1)
        rows = (pairs[:, None] * (inter2 // 2) + self._rows_i).view(-1)
        return F.embedding_bag(rows, layer.down.view(-1, hidden), self._bags_i[:n], mode="sum",
                               per_sample_weights=(F.silu(gate) * up).view(-1))

    def _expert_groups(self, layer: Layer, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """`(T k, H)` as `_expert_rows`, through the pairs sorted by expert and grouped matmuls."""
        _, order = torch.sort(pairs)
        ends = torch.cumsum(torch.bincount(pairs, minlength=layer.gate_up.shape[0]), 0, dtype=torch.int32)
        gate, up = F.grouped_mm(x[order // self.spec.experts_per_token], layer.gate_up, offs=ends).chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, layer.down, offs=ends)
        return torch.empty_like(y).index_copy_(0, order, y)

    @staticmethod
    def _dense(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.mlp_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.mlp_down)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: list[StepSeq]) -> list[torch.Tensor]:
        """Run one packed step; return per sequence the logits `[n or 1, vocab]` (float32)."""
        spec = self.spec
        for s in batch:
            if s.past + s.ids.numel() > self.cache.max_len:
                raise ValueError(f"sequence in slot {s.slot} exceeds the cache length {self.cache.max_len}")
        step = Step(self, batch)
        h, ds_index, ds_rows = self._embed(batch, step.ids)
        for i, layer in enumerate(self.w.layers):
            h = h + self._attention(i, rms_norm(h, layer.input_norm, spec.rms_norm_eps), step)
            x = rms_norm(h, layer.post_norm, spec.rms_norm_eps)
            h = h + (self._moe(layer, x) if layer.router is not None else self._dense(layer, x))
            if ds_index is not None and i < self.levels:
                h.index_add_(0, ds_index, ds_rows[i])
        if step.picks is not None:
            h = h[step.picks]
        logits = F.linear(rms_norm(h, self.w.norm, spec.rms_norm_eps), self.w.lm_head).float()
        return list(logits.split(step.pick_sizes))
