"""Token selection: greedy, or seeded sampling with temperature, top-k and top-p.

A sampled token's random draw depends only on the seed and the token's position in the sequence
(`TokenDraws`: a counter-based stream), never on how many draws came before in this process: a
generation that continues elsewhere, its tokens so far in the prompt (a migrated sequence), draws
what the uninterrupted run would have drawn."""

from __future__ import annotations

from typing import Sequence

import torch

from qwen3vl_triton.contract import SamplingParams  # the contract's sampling inputs

__all__ = ["NonFiniteLogits", "SamplingParams", "TokenDraws", "make_generator", "sample"]

_MASK = 2**64 - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: distinct (seed, position) pairs give unrelated torch seeds."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class TokenDraws:
    """The random draws of one request: `at(position)` is a generator seeded from (seed, position)."""

    def __init__(self, seed: int):
        self.seed = seed % 2**64

    def at(self, position: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(_mix((self.seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK) % 2**63)
        return gen


def make_generator(params: SamplingParams) -> TokenDraws | None:
    """The request's draws: from its seed, or from a random one (None for greedy)."""
    if params.greedy:
        return None
    import secrets

    return TokenDraws(secrets.randbits(64) if params.seed is None else params.seed)


class NonFiniteLogits(ArithmeticError):
    """The model's logits for a request hold NaN or Inf: its tokens would be meaningless."""


def sample(logits: torch.Tensor, params: SamplingParams, gen: TokenDraws | None,
           banned: Sequence[int] = (), position: int = 0) -> int:
    """One token from `[vocab]` float32 logits, never one of `banned` (e.g. the end ids while a
    request's min_tokens are not reached); `position`: the token's index in its sequence (prompt
    included), which with the seed fixes the draw.

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
    return int(torch.multinomial(probs, 1, generator=None if gen is None else gen.at(position)))
