"""Token selection: greedy, or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

from typing import Sequence

import torch

from qwen3vl_triton.contract import SamplingParams  # the contract's sampling inputs

__all__ = ["NonFiniteLogits", "SamplingParams", "make_generator", "sample"]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed % 2**63)  # torch seeds are signed 64-bit
    return gen


class NonFiniteLogits(ArithmeticError):
    """The model's logits for a request hold NaN or Inf: its tokens would be meaningless."""


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
           banned: Sequence[int] = ()) -> int:
    """One token from `[vocab]` float32 logits, never one of `banned` (e.g. the end ids while a
    request's min_tokens are not reached).

    The logits are shifted so that their maximum is 0 before dividing by the temperature: every
    scaled value is then <= 0 and the best token's is exactly 0, so no temperature, however
    small (1e-45 divides to -inf, not to a NaN), can overflow the softmax."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the model's logits for this request are not finite (NaN or Inf)")
    if banned:
        logits = logits.index_fill(0, torch.tensor(sorted(banned)), float("-inf"))
    if params.greedy:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keeps the token that crosses top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
