"""Admission, KV-cache slots, cancellation, the plan of each step, what a step's results do
to its sequences, and the statistics (see the package docstring).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from qwen3vl_triton.contract import FinishReason, LLMRequest
from qwen3vl_triton.engine.prefix import Keys, PrefixCache, PrefixStats
from qwen3vl_triton.errors import ENGINE_QUEUE_FULL, Unavailable
from qwen3vl_triton.model import mrope
from qwen3vl_triton.model.checkpoint import ModelSpec
from qwen3vl_triton.model.lm import KVCache
from qwen3vl_triton.model.sampling import TokenDraws, make_generator

# on_tokens(new_token_ids, finish_reason, error): finish_reason is None while the sequence runs,
# then a FinishReason: STOP (end token), LENGTH (max tokens or context), CANCELLED, ERROR.
Callback = Callable[[list[int], "FinishReason | None", "str | None"], None]

@dataclass(eq=False)
class Request(LLMRequest):
    """One generation inside the engine: the contract's request (`LLMRequest`), the consumer of
    its tokens and its id."""

    on_tokens: Callback | None = None
    request_id: str = ""

@dataclass(eq=False)
class _Seq:
    req: Request
    slot: int
    tokens: list[int]
    prompt_len: int
    cos: torch.Tensor  # (prompt_len, d/2) prompt rotary angles
    sin: torch.Tensor
    gen: TokenDraws | None  # the request's random draws (sampling.TokenDraws)
    end_ids: frozenset[int]
    cached: int = 0  # tokens in the KV cache
    generated: int = 0
    cancelled: bool = False
    keys: Keys | None = None  # prefix-cache key material (None: no reuse for this sequence)

@dataclass
class StepReport:
    sequences: int  # sequences advanced by the step
    prompt_tokens: int  # prompt tokens prefilled
    decode_tokens: int  # sequences that decoded one token
    generated: int  # tokens chosen by the step (decodes and prompts that completed)
    seconds: float
    running: int  # sequences running after the step
    waiting: int  # requests queued for a place
    prefix: PrefixStats | None = None  # the prefix cache's totals after the step (None: no cache)

@dataclass
class EngineStats:
    steps: int = 0
    batched_steps: int = 0  # steps that advanced more than one sequence
    max_batch: int = 0
    mixed_steps: int = 0  # steps where a prompt chunk shared the forward with decoding sequences
    tokens_in: int = 0  # prompt tokens prefilled
    tokens_out: int = 0  # tokens generated
    requests: int = 0
    step_seconds: float = 0.0
    batch_histogram: dict = field(default_factory=lambda: collections.Counter())

    def add(self, report: StepReport) -> None:
        if not report.sequences:
            return
        self.steps += 1
        self.step_seconds += report.seconds
        self.max_batch = max(self.max_batch, report.sequences)
        self.batched_steps += report.sequences > 1
        self.mixed_steps += 0 < report.decode_tokens < report.sequences
        self.batch_histogram[report.sequences] += 1
        self.tokens_in += report.prompt_tokens
        self.tokens_out += report.generated

Plan = list[tuple[_Seq, int]]  # (sequence, new tokens) of one step

class Scheduler:
    """Admission, slots, cancellation, plans, and what step results do. Requests arrive from any
    thread (`add`, `cancel`); everything else runs on the engine thread."""

    def __init__(self, spec: ModelSpec, cache: KVCache, max_batch: int, max_seq_len: int, max_num_tokens: int,
                 max_queue: int, emit: Callable, on_step: Callable[[StepReport], None] | None,
                 prefix: PrefixCache | None = None):
        """`prefix`: the prefix cache (None: no KV reuse) over `cache`'s store."""
        self.spec, self.cache, self.prefix = spec, cache, prefix
        self.max_batch, self.max_seq_len, self.max_num_tokens, self.max_queue = (
            max_batch, max_seq_len, max_num_tokens, max_queue)
        self.emit = emit  # emit(callback, args): hand a consumer call to the delivery thread
        self.on_step = on_step
        self.stats = EngineStats()
        self._pending: collections.deque[Request] = collections.deque()
        self._active: list[_Seq] = []
        self._cancel: set[str] = set()
        self._cv = threading.Condition()
        self._stopped = False
        self._closing: str | None = None  # close(): why every request ends and new ones are refused

    # -- any thread ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            if self._closing is not None:
                raise Unavailable(self._closing)
            if len(self._pending) >= self.max_queue:
                raise Unavailable(f"{ENGINE_QUEUE_FULL}: the {self.max_queue} places for requests waiting to "
                                  f"join the running batch are taken; retry later")
            self._pending.append(req)
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify()

    def load(self) -> int:
        with self._cv:
            return len(self._active) + len(self._pending)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def close(self, reason: str) -> None:
        """End every request, waiting or running, with the error `reason` (on the engine thread's
        next turn), and refuse new ones with Unavailable(reason): the server is stopping."""
        with self._cv:
            self._closing = reason
            self._cv.notify()

    # -- engine thread --------------------------------------------------------------------------
    def next_plan(self) -> Plan | None:
        """Wait for work; take new requests and cancellations; return the next step's plan
        (empty when cancellations left nothing to run), or None once stopped."""
        with self._cv:
            while not self._stopped and not self._pending and not self._active:
                self._cv.wait()
            if self._stopped:
                return None
            closing, refused = self._closing, []
            if closing is not None:
                refused = list(self._pending)
                self._pending.clear()
            for seq in self._active:
                if seq.req.request_id in self._cancel:
                    seq.cancelled = True
            # keep only cancellations of requests still waiting; one for a request that has
            # already finished would otherwise stay here forever
            self._cancel &= {r.request_id for r in self._pending}
            self._admit()
        if closing is not None:
            for req in refused:
                self._emit(req, [], "error", closing)
            for seq in list(self._active):
                self.finish(seq, "error", closing)
        cancelled = [s for s in self._active if s.cancelled]
        for seq in cancelled:
            self.finish(seq, FinishReason.CANCELLED)
        if not self._active:
            if cancelled or closing is not None:  # no step follows: say that the batch emptied
                self._report(StepReport(0, 0, 0, 0, 0.0, 0, len(self._pending)))
            return []
        self._compact()
        plan, budget = [], self.max_num_tokens
        for seq in self._active:  # every decode first, then prompt chunks within the budget
            if seq.cached >= seq.prompt_len:
                plan.append((seq, 1))
                budget -= 1
        for seq in self._active:
            if seq.cached < seq.prompt_len and budget > 0:
                n = min(seq.prompt_len - seq.cached, budget)
                plan.append((seq, n))
                budget -= n
        return plan

    def update(self, plan: Plan, results: list, seconds: float) -> None:
        """Apply a step's results (`Runner.run`): tokens out, sequences finished, statistics."""
        decode = sum(1 for seq, _ in plan if seq.cached >= seq.prompt_len)
        generated = 0
        for (seq, n), result in zip(plan, results):
            if isinstance(result, Exception):
                self.finish(seq, FinishReason.ERROR, f"generation failed: {result}")
                continue
            seq.cached += n
            if result is not None:
                generated += 1
                self._advance(seq, result)
        self._report(StepReport(len(plan), sum(n for _, n in plan) - decode, decode, generated, seconds,
                                len(self._active), len(self._pending)))

    def fail_all(self, message: str) -> None:
        for seq in list(self._active):
            self.finish(seq, FinishReason.ERROR, message)

    def finish(self, seq: _Seq, reason: FinishReason, error: str | None = None,
               tokens: list[int] | None = None) -> None:
        if seq in self._active:
            self._active.remove(seq)
            kept = False
            if self.prefix is not None and reason != FinishReason.ERROR:
                try:
                    kept = self.prefix.keep(seq.keys, seq.tokens, seq.cached, seq.slot)
                except Exception:  # keeping is an optimisation: never fail a finished request for it
                    kept = False
            release = getattr(self.cache, "release", None)  # a cache that frees a slot's memory (ggml)
            if not kept and release is not None:
                release(seq.slot)
        self._emit(seq.req, tokens or [], reason, error)

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.max_batch:
            req = self._pending.popleft()
            if req.request_id in self._cancel:
                self._cancel.discard(req.request_id)
                self._emit(req, [], FinishReason.CANCELLED)
                continue
            try:
                ids = [int(x) for x in np.asarray(req.input_ids).reshape(-1)]
                if req.mrope_cos_sin is not None:
                    cos, sin = mrope.unpack_cos_sin(req.mrope_cos_sin, self.spec, len(ids))
                else:  # text positions 0..L-1
                    cos, sin = mrope.text_cos_sin(torch.arange(len(ids)), self.spec)
                gen = make_generator(req.sampling)
            except Exception as exc:  # validation let through something that cannot run: this request only
                self._emit(req, [], FinishReason.ERROR, f"request refused: {type(exc).__name__}: {exc}")
                continue
            used = {s.slot for s in self._active}
            slot = next(i for i in range(self.max_batch) if i not in used)
            self.cache.claim(slot)
            end_ids = (frozenset(self.spec.end_ids) | frozenset(req.stop_ids)
                       | ({req.end_id} if req.end_id is not None else set()))
            seq = _Seq(req, slot, ids, len(ids), cos, sin, gen, end_ids)
            if self.prefix is not None:
                try:
                    seq.keys = self.prefix.keys(ids, cos, sin, req)
                    seq.cached = self.prefix.admit(seq.keys, seq.prompt_len, seq.tokens, slot)
                except Exception:  # reuse is an optimisation: this request prefills everything
                    seq.keys, seq.cached = None, 0
                    self.cache.claim(slot)
            self._active.append(seq)
            self.stats.requests += 1

    def _compact(self) -> None:
        """Keep occupied slots dense from 0 so decode attention reads a view of the cache."""
        for target, seq in enumerate(sorted(self._active, key=lambda s: s.slot)):
            if seq.slot != target:
                self.cache.move(seq.slot, target)
                seq.slot = target

    def _advance(self, seq: _Seq, token: int) -> None:
        seq.generated += 1
        seq.tokens.append(token)
        # Like TensorRT-LLM, the end token is part of the output: consumers see where it stopped.
        if token in seq.end_ids:
            self.finish(seq, FinishReason.STOP, tokens=[token])
        elif seq.generated >= seq.req.max_new_tokens or len(seq.tokens) >= self.max_seq_len:
            self.finish(seq, FinishReason.LENGTH, tokens=[token])
        else:
            self._emit(seq.req, [token], None)

    def _report(self, report: StepReport) -> None:
        if self.prefix is not None:
            report.prefix = dataclasses.replace(self.prefix.stats)
        self.stats.add(report)
        if self.on_step is not None:
            self.emit(self.on_step, (report,))

    def _emit(self, req: Request, tokens: list[int], finish: FinishReason | None, error: str | None = None) -> None:
        if req.on_tokens is not None:
            self.emit(req.on_tokens, (tokens, finish, error))
