"""The step: one plan through the model, then a token for each sequence that needs one.
"""

from __future__ import annotations

import torch

from qwen3vl_triton.engine.scheduler import Plan, _Seq
from qwen3vl_triton.model.lm import KVCache, LanguageModel, StepSeq
from qwen3vl_triton.model.sampling import sample

# torch threads of every step but a lone prompt's prefill (see Runner); the bench times the
# in-process decode step with it too
DECODE_THREADS = 1

class Runner:
    """Runs a plan: one forward for the whole batch, then a token for every sequence whose prompt
    is complete. When the batched forward raises, each sequence runs alone, so only the one at
    fault fails (rewriting a sequence's new cache rows is harmless: the retry writes the same
    rows). Sampling is per sequence: one request's numbers never fail another.

    Threads: a step that prefills one prompt (at least `parallel_min_tokens` tokens) while no
    other sequence runs uses `threads` -- it is compute-bound and its request waits for it.
    Every other step -- decoding, or prefilling while others decode -- runs on `shared_threads`:
    a decode step reads the weights of the experts it touches and gains little from a second
    thread, and under concurrency the other cores are busy with the vision encoder and the
    server; an OpenMP team that loses a core to them stalls at every op."""

    def __init__(self, lm: LanguageModel, threads: int, shared_threads: int, parallel_min_tokens: int):
        self.lm = lm
        self.threads, self.shared_threads, self.parallel_min_tokens = threads, shared_threads, parallel_min_tokens

    def run(self, plan: Plan) -> list:
        """Per sequence of the plan: its next token, None (its prompt goes on), or the exception
        that failed it."""
        alone = len(plan) == 1 and plan[0][1] >= self.parallel_min_tokens
        threads = self.threads if alone else self.shared_threads
        if torch.get_num_threads() != threads:  # OpenMP and MKL keep this per thread: the engine's
            torch.set_num_threads(threads)
        inputs = [self._inputs(seq, n) for seq, n in plan]
        try:
            logits: list = self.lm.forward(inputs)
        except Exception as exc:
            logits = [exc] if len(plan) == 1 else [self._forward_alone(s) for s in inputs]
        return [self._choose(seq, n, row) for (seq, n), row in zip(plan, logits)]

    def _inputs(self, seq: _Seq, n: int) -> StepSeq:
        start = seq.cached
        ids = torch.tensor(seq.tokens[start:start + n], dtype=torch.int64)
        if start < seq.prompt_len:  # prompt chunk: angles from the M-RoPE table
            return StepSeq(seq.slot, ids, start, seq.cos[start:start + n], seq.sin[start:start + n], seq.req.table)
        # decoded token: all three M-RoPE rows equal position + delta
        return StepSeq(seq.slot, ids, start, table=seq.req.table, delta=seq.req.mrope_delta)

    def _forward_alone(self, inputs: StepSeq):
        try:
            return self.lm.forward([inputs])[0]
        except Exception as exc:
            return exc

    @staticmethod
    def _choose(seq: _Seq, n: int, logits) -> "int | None | Exception":
        if isinstance(logits, Exception):
            return RuntimeError(f"engine step failed: {type(logits).__name__}: {logits}")
        if seq.cached + n < seq.prompt_len:
            return None  # more prompt to prefill
        # as TensorRT-LLM's min_tokens: no end token before that many tokens
        banned = seq.end_ids if seq.generated < seq.req.min_tokens else ()
        try:
            return sample(logits[-1], seq.req.sampling, seq.gen, banned, seq.prompt_len + seq.generated)
        except Exception as exc:
            return exc


class KVPrefixStore:
    """The prefix cache's store (engine.prefix.PrefixStore) over the torch runner's `KVCache`: an
    entry is a copy of the sequence's rows of every layer, put back into a slot when reused."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        k = cache.k[0]
        self.token_bytes = 2 * len(cache.k) * k.shape[1] * k.shape[3] * k.element_size()

    def keep(self, slot: int, tokens: int):
        k = torch.stack([layer[slot, :, :tokens] for layer in self.cache.k])
        v = torch.stack([layer[slot, :, :tokens] for layer in self.cache.v])
        return (k, v), k.nbytes + v.nbytes

    def restore(self, handle, slot: int, tokens: int, cut_position: int) -> None:
        k, v = handle
        for i, (kc, vc) in enumerate(zip(self.cache.k, self.cache.v)):
            kc[slot, :, :tokens] = k[i, :, :tokens]
            vc[slot, :, :tokens] = v[i, :, :tokens]
        self.cache.written[slot] = self.cache.clean[slot] = tokens

    def drop(self, handle) -> None:
        pass

    def room(self) -> None:
        return None

    def cost(self, tokens: int) -> int:
        return tokens * self.token_bytes
