"""Per-request sampling: ``SamplingParams`` (checked when made) and ``sample``, one token from one row of logits.

The order is the usual one: repetition penalty on the raw logits, then temperature, top-k and top-p, then a
draw from the request's own seeded generator. Temperature 0 is greedy (argmax after the penalty). With
``top_p=1`` and no penalty the draw is the one ``trainer generate`` makes (same operations, same generator
use), so a seed gives the same tokens in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import TrainerError

MAX_STOPS = 8


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued: up to ``max_tokens`` new tokens; ``stop`` strings end it (the text
    stops before the first one); the end-of-text token ends it unless ``ignore_eos``; ``seed=None`` draws
    a fresh seed."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        problem = self.problem()
        if problem is not None:
            raise TrainerError(f"{problem[0]}: {problem[1]}")

    def problem(self) -> tuple[str, str] | None:
        """The first field that breaks a rule and what is wrong, or ``None``."""
        if not _int(self.max_tokens) or self.max_tokens < 1:
            return "max_tokens", f"{self.max_tokens!r} must be an integer >= 1"
        if not _number(self.temperature) or self.temperature < 0:
            return "temperature", f"{self.temperature!r} must be a number >= 0 (0: greedy)"
        if self.top_k is not None and (not _int(self.top_k) or self.top_k < 1):
            return "top_k", f"{self.top_k!r} must be an integer >= 1 (or absent)"
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            return "top_p", f"{self.top_p!r} must be a number in (0, 1]"
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            return "repetition_penalty", f"{self.repetition_penalty!r} must be a number > 0 (1: none)"
        if self.seed is not None and (not _int(self.seed) or not 0 <= self.seed < 2**63):
            return "seed", f"{self.seed!r} must be an integer in [0, 2**63)"
        if len(self.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in self.stop):
            return "stop", f"{list(self.stop)!r} must be at most {MAX_STOPS} non-empty strings"
        return None


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: list[int]) -> int:
    """One token id drawn from ``logits`` (``[vocab]``, float32) of a request that has ``seen`` these ids
    (its prompt and output, for the repetition penalty)."""
    if params.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)), device=logits.device)
        scores = logits[ids]
        penalty = params.repetition_penalty
        logits = logits.index_copy(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        cutoff = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    if params.top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # the mass of the more likely tokens: keep while it is below top_p
        drop = order[before >= params.top_p]
        logits = logits.index_fill(0, drop, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
