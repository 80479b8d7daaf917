"""The CPU LLM engine: in-flight batching over `lm.LanguageModel`, with the `tensorrt_llm` contract.

Every step advances all running sequences by one token and gives waiting requests (up to
`max_num_tokens` prompt tokens per step, chunked when longer) a place in the same forward pass,
so a request that arrives while others decode joins the running batch. Tokens go back through
each request's callback as soon as they are chosen.

Three parts, as in vLLM's scheduler and model runner:
- `Scheduler`: admission (a bounded queue of requests waiting for a place), KV-cache slots,
  cancellation, the plan of each step, what a step's results do to its sequences (new tokens,
  stops, errors), and the statistics -- one path: each step's `StepReport` feeds `EngineStats`
  and `on_step`;
- `Runner`: one plan through the model, then a token for each sequence that needs one; a fault
  stays with the sequence that caused it;
- `Engine`: the public API and two threads. The engine thread's loop is plan -> run -> update;
  a delivery thread calls the consumers' callbacks in order.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import mrope
from .backend import scalar, single_sequence, to_torch
from .checkpoint import ModelSpec
from .errors import InputError, Unavailable
from .lm import KVCache, LanguageModel, StepSeq
from .sampling import SamplingParams, make_generator, sample
from .stop_words import stop_word_ids
from .table import stride_of

# on_tokens(new_token_ids, finish_reason, error): finish_reason is None while the sequence runs,
# then one of "stop" (end token), "length" (max tokens or context), "cancelled", "error".
Callback = Callable[[list[int], "str | None", "str | None"], None]


@dataclass(eq=False)
class Request:
    """One generation, in the units of the `tensorrt_llm` contract."""

    input_ids: np.ndarray  # (L,) prompt; ids >= vocab_size read the prompt table
    max_new_tokens: int  # request_output_len
    end_id: int | None = None  # generation also stops at every end id of the checkpoint
    stop_ids: tuple[int, ...] = ()  # stop_words_list's one-token words (the contract's stop words)
    table: torch.Tensor | None = None  # prompt_embedding_table (rows, H)
    mrope_cos_sin: np.ndarray | None = None  # mrope_rotary_cos_sin, flat
    mrope_delta: int = 0  # mrope_position_deltas
    sampling: SamplingParams = field(default_factory=SamplingParams)
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
    gen: torch.Generator | None
    end_ids: frozenset[int]
    cached: int = 0  # tokens in the KV cache
    generated: int = 0
    cancelled: bool = False


@dataclass
class StepReport:
    sequences: int  # sequences advanced by the step
    prompt_tokens: int  # prompt tokens prefilled
    decode_tokens: int  # sequences that decoded one token
    generated: int  # tokens chosen by the step (decodes and prompts that completed)
    seconds: float
    running: int  # sequences running after the step
    waiting: int  # requests queued for a place


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
                 max_queue: int, emit: Callable, on_step: Callable[[StepReport], None] | None):
        self.spec, self.cache = spec, cache
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

    # -- any thread ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            if len(self._pending) >= self.max_queue:
                raise Unavailable(f"engine queue full: the {self.max_queue} places for requests waiting to "
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

    # -- engine thread --------------------------------------------------------------------------
    def next_plan(self) -> Plan | None:
        """Wait for work; take new requests and cancellations; return the next step's plan
        (empty when cancellations left nothing to run), or None once stopped."""
        with self._cv:
            while not self._stopped and not self._pending and not self._active:
                self._cv.wait()
            if self._stopped:
                return None
            for seq in self._active:
                if seq.req.request_id in self._cancel:
                    seq.cancelled = True
            # keep only cancellations of requests still waiting; one for a request that has
            # already finished would otherwise stay here forever
            self._cancel &= {r.request_id for r in self._pending}
            self._admit()
        cancelled = [s for s in self._active if s.cancelled]
        for seq in cancelled:
            self.finish(seq, "cancelled")
        if not self._active:
            if cancelled:  # no step follows: say that the batch emptied
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
                self.finish(seq, "error", f"generation failed: {result}")
                continue
            seq.cached += n
            if result is not None:
                generated += 1
                self._advance(seq, result)
        self._report(StepReport(len(plan), sum(n for _, n in plan) - decode, decode, generated, seconds,
                                len(self._active), len(self._pending)))

    def fail_all(self, message: str) -> None:
        for seq in list(self._active):
            self.finish(seq, "error", message)

    def finish(self, seq: _Seq, reason: str, error: str | None = None, tokens: list[int] | None = None) -> None:
        if seq in self._active:
            self._active.remove(seq)
        self._emit(seq.req, tokens or [], reason, error)

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.max_batch:
            req = self._pending.popleft()
            if req.request_id in self._cancel:
                self._cancel.discard(req.request_id)
                self._emit(req, [], "cancelled")
                continue
            try:
                ids = [int(x) for x in np.asarray(req.input_ids).reshape(-1)]
                if req.mrope_cos_sin is not None:
                    cos, sin = mrope.unpack_cos_sin(req.mrope_cos_sin, self.spec, len(ids))
                else:  # text positions 0..L-1
                    cos, sin = mrope.text_cos_sin(torch.arange(len(ids)), self.spec)
                gen = make_generator(req.sampling)
            except Exception as exc:  # validation let through something that cannot run: this request only
                self._emit(req, [], "error", f"request refused: {type(exc).__name__}: {exc}")
                continue
            used = {s.slot for s in self._active}
            slot = next(i for i in range(self.max_batch) if i not in used)
            self.cache.claim(slot)
            end_ids = (frozenset(self.spec.end_ids) | frozenset(req.stop_ids)
                       | ({req.end_id} if req.end_id is not None else set()))
            self._active.append(_Seq(req, slot, ids, len(ids), cos, sin, gen, end_ids))
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
            self.finish(seq, "stop", tokens=[token])
        elif seq.generated >= seq.req.max_new_tokens or len(seq.tokens) >= self.max_seq_len:
            self.finish(seq, "length", tokens=[token])
        else:
            self._emit(seq.req, [token], None)

    def _report(self, report: StepReport) -> None:
        self.stats.add(report)
        if self.on_step is not None:
            self.emit(self.on_step, (report,))

    def _emit(self, req: Request, tokens: list[int], finish: str | None, error: str | None = None) -> None:
        if req.on_tokens is not None:
            self.emit(req.on_tokens, (tokens, finish, error))


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
        try:
            return sample(logits[-1], seq.req.sampling, seq.gen)
        except Exception as exc:
            return exc


class Engine:
    def __init__(self, spec: ModelSpec, dtype: str = "float32", max_batch: int = 16,
                 max_seq_len: int | None = None, max_num_tokens: int = 1024, max_output_len: int | None = None,
                 on_step: Callable[["StepReport"], None] | None = None, threads: int | None = None,
                 shared_threads: int = DECODE_THREADS, parallel_min_tokens: int = 64, max_queue: int = 128):
        """`on_step` is called after every step, e.g. to export metrics, and with a report of zero
        sequences when cancellations empty the batch without a step. `max_queue` bounds the
        requests waiting for a place in the running batch; past it `submit` raises Unavailable.

        Callbacks (each request's `on_tokens`, and `on_step`) run on one delivery thread, in the
        order the engine produced them, while the engine thread goes on with the next step: in
        the server they hand responses to Triton, and each `send` waits for the server. Only
        that thread calls them, so a consumer never sees two callbacks at once. (In a Triton
        2.51 stub, a send beside the engine's torch work needs `backend.send_response`: without
        it the stub crashed, see there.) `threads`, `shared_threads`, `parallel_min_tokens`: see
        `Runner`."""
        self.spec = spec
        self.max_seq_len = min(max_seq_len or 4096, spec.max_position_embeddings)
        self.max_output_len = max_output_len or self.max_seq_len
        self.lm = LanguageModel(spec, dtype=dtype, slots=max_batch, max_len=self.max_seq_len)
        threads = threads or torch.get_num_threads()
        self.runner = Runner(self.lm, threads, min(shared_threads, threads), parallel_min_tokens)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.scheduler = Scheduler(spec, self.lm.cache, max_batch, self.max_seq_len, max_num_tokens, max_queue,
                                   emit=lambda callback, args: self._outbox.put((callback, args)), on_step=on_step)
        self.stats = self.scheduler.stats
        self._ids = itertools.count()
        self._delivery = threading.Thread(target=self._deliver, name="engine-delivery", daemon=True)
        self._delivery.start()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        """Raise InputError naming the contract input that is wrong."""
        spec = self.spec
        ids = np.asarray(req.input_ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise InputError("input_ids", f"must be integer token ids, got {ids.dtype}")
        if ids.size == 0:
            raise InputError("input_ids", "is empty")
        if ids.size >= self.max_seq_len:
            raise InputError("input_ids", f"{ids.size} tokens, the context limit is {self.max_seq_len}")
        if not 1 <= req.max_new_tokens <= self.max_output_len:
            raise InputError("request_output_len", f"must be in [1, {self.max_output_len}], got {req.max_new_tokens}")
        if ids.min() < 0:
            raise InputError("input_ids", f"negative token id {int(ids.min())}")
        rows = 0 if req.table is None else req.table.shape[0]
        if req.table is not None:
            if not req.table.is_floating_point():
                raise InputError("prompt_embedding_table", f"must be a floating-point tensor, got {req.table.dtype}")
            if req.table.ndim != 2 or req.table.shape[1] != spec.hidden_size:
                raise InputError("prompt_embedding_table", f"must be [rows, {spec.hidden_size}], got {list(req.table.shape)}")
            try:
                stride = stride_of(rows, spec.deepstack_levels)
            except ValueError as exc:
                raise InputError("prompt_embedding_table", str(exc)) from None
            if not bool(torch.isfinite(req.table).all()):
                raise InputError("prompt_embedding_table", "holds NaN or infinite values")
        else:
            stride = 0
        if int(ids.max()) >= spec.vocab_size + stride:
            raise InputError(
                "input_ids",
                f"id {int(ids.max())} is neither a vocabulary id (< {spec.vocab_size}) nor one of the "
                f"{stride} image rows of the prompt table",
            )
        if req.mrope_cos_sin is not None:
            flat = np.asarray(req.mrope_cos_sin).reshape(-1)
            if flat.size % spec.rotary_dim or flat.size // spec.rotary_dim < ids.size:
                raise InputError(
                    "mrope_rotary_cos_sin",
                    f"must hold at least {ids.size} positions of {spec.rotary_dim} values, got {flat.size} values",
                )
            if not np.isfinite(flat).all() or np.abs(flat).max(initial=0) > 1:
                raise InputError("mrope_rotary_cos_sin", "must hold cosines and sines: finite values in [-1, 1]")
        # decode positions (cache length + delta) must lie in [0, max_position_embeddings)
        low, high = -ids.size, spec.max_position_embeddings - self.max_seq_len
        if not low <= req.mrope_delta <= high:
            raise InputError("mrope_position_deltas", f"must be in [{low}, {high}] (decode positions within the "
                                                      f"model's {spec.max_position_embeddings}), got {req.mrope_delta}")
        if req.end_id is not None and not 0 <= req.end_id < spec.vocab_size:
            raise InputError("end_id", f"must be a vocabulary id, got {req.end_id}")

    def submit(self, req: Request) -> str:
        """Queue a request (validated) and return its id; tokens arrive through `req.on_tokens`.
        Raises InputError for a bad request, Unavailable when the queue is full."""
        self.validate(req)
        if not req.request_id:
            req.request_id = f"r{next(self._ids)}"
        self.scheduler.add(req)
        return req.request_id

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def generate(self, req: Request, timeout: float | None = None) -> tuple[list[int], str]:
        """Blocking helper: all generated ids and the finish reason."""
        out: list[int] = []
        done = threading.Event()
        result: dict = {}

        def on_tokens(tokens, finish, error):
            out.extend(tokens)
            if finish is not None:
                result["finish"], result["error"] = finish, error
                done.set()

        req.on_tokens = on_tokens
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req.request_id)
            raise TimeoutError("generation did not finish in time")
        if result["finish"] == "error":
            raise RuntimeError(result["error"])
        return out, result["finish"]

    def load(self) -> int:
        """Sequences running or waiting."""
        return self.scheduler.load()

    def shutdown(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=10)
        self._outbox.put(None)  # after everything the engine thread queued: that still goes out
        self._delivery.join(timeout=10)

    # -- the two threads -------------------------------------------------------------------------
    def _loop(self) -> None:
        """The engine thread: plan, run, update."""
        while True:
            try:
                plan = self.scheduler.next_plan()
                if plan is None:
                    return
                if not plan:
                    continue
                t0 = time.perf_counter()
                results = self.runner.run(plan)
                self.scheduler.update(plan, results, time.perf_counter() - t0)
            except Exception as exc:  # a scheduler bug must fail requests, never hang them
                self.scheduler.fail_all(f"engine failure: {type(exc).__name__}: {exc}")

    def _deliver(self) -> None:
        """The delivery thread: call the callbacks the engine queued, in order."""
        while (item := self._outbox.get()) is not None:
            callback, args = item
            try:
                callback(*args)
            except Exception:  # a broken consumer (or metrics) must never stop the others
                pass


# The `tensorrt_llm` inputs (DESIGN §3), as the tensorrtllm backend names them.
CONTRACT_INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list", "streaming",
    "temperature", "runtime_top_k", "runtime_top_p", "seed", "random_seed",
    "prompt_embedding_table", "prompt_vocab_size", "mrope_rotary_cos_sin", "mrope_position_deltas",
)


def _seed(arrays: dict) -> int | None:
    """TensorRT-LLM 1.2's backend names the sampling seed `seed`; older backends `random_seed`."""
    seed, legacy = scalar(arrays, "seed", int), scalar(arrays, "random_seed", int)
    if seed is not None and legacy is not None and seed != legacy:
        raise InputError("seed", f"seed {seed} and random_seed {legacy} disagree; send one of them")
    return seed if seed is not None else legacy


def request_from_contract(arrays: dict, spec: ModelSpec) -> tuple[Request, bool]:
    """An engine Request (and the `streaming` flag) from `tensorrt_llm` input tensors.

    Each tensor carries the batch dimension (one sequence per request)."""
    ids = single_sequence(arrays, "input_ids").reshape(-1)
    length = scalar(arrays, "input_lengths", int, default=ids.size)
    if not 0 < length <= ids.size:
        raise InputError("input_lengths", f"must be in [1, {ids.size}] (the input_ids length), got {length}")
    table = None
    if arrays.get("prompt_embedding_table") is not None:
        table = to_torch(single_sequence(arrays, "prompt_embedding_table"))
        rows = scalar(arrays, "prompt_vocab_size", int, default=table.shape[0])
        if rows != table.shape[0]:
            raise InputError("prompt_vocab_size", f"is {rows} but prompt_embedding_table has {table.shape[0]} rows")
    cos_sin = arrays.get("mrope_rotary_cos_sin")
    if cos_sin is not None:
        cos_sin = single_sequence(arrays, "mrope_rotary_cos_sin")
    sampling = SamplingParams(
        temperature=scalar(arrays, "temperature", float, default=0.0),
        top_k=scalar(arrays, "runtime_top_k", int, default=0),
        top_p=scalar(arrays, "runtime_top_p", float, default=1.0),
        seed=_seed(arrays),
    )
    req = Request(
        input_ids=ids[:length],
        max_new_tokens=scalar(arrays, "request_output_len", int, required=True),
        end_id=scalar(arrays, "end_id", int, default=spec.end_id),
        stop_ids=stop_word_ids(arrays.get("stop_words_list")),
        table=table,
        mrope_cos_sin=cos_sin,
        mrope_delta=scalar(arrays, "mrope_position_deltas", int, default=0),
        sampling=sampling,
    )
    return req, scalar(arrays, "streaming", bool, default=False)
