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

from qwen3vl_triton.contract import FinishReason, SamplingParams
from qwen3vl_triton.engine.engine import Engine
from qwen3vl_triton.engine.runner import DECODE_THREADS, Runner
from qwen3vl_triton.engine.scheduler import EngineStats, Request, Scheduler, StepReport

__all__ = ["DECODE_THREADS", "Engine", "EngineStats", "FinishReason", "Request", "Runner", "SamplingParams",
           "Scheduler", "StepReport"]
