"""The scheduler: which tokens of which sequences the next step runs, within a token budget and the pool.

Every sequence is ``tokens = prompt + output`` of which the first ``computed`` have keys and values in the
pool; a step runs the next tokens of some sequences and samples after the last token of those whose step
reaches the end. A new sequence is *prefilling* (several tokens to run), a running one that has them all
is *decoding* (one token). Per step, within ``max_batch_tokens`` tokens and ``max_seqs`` sequences:

1. every decoding sequence gets its token, oldest first; when the pool has no block for it, the youngest
   running sequence is *preempted* (its blocks freed, itself queued again at the front, its prompt and
   output recomputed later: the tokens and the sampling generator carry on unchanged);
2. prefilling sequences, oldest first, get chunks of what budget is left (chunked prefill: a long prompt
   takes several steps and never holds back the decoding ones);
3. (``continuous``) waiting sequences join, oldest first, while the budget, the pool and ``max_seqs``
   allow; ``static`` admits a new batch only when the running one has finished.

A waiting sequence is never admitted by preempting a running one, so the pool full means: queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import TrainerError
from .paged import BlockPool, Segment
from .sampling import SamplingParams

POLICIES = ("continuous", "static")


@dataclass(eq=False)
class Sequence:
    """One request in the engine."""

    id: str
    order: int  # arrival: lower is older
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    computed: int = 0
    table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""  # the output text up to a stop string (the engine's detokenizer keeps it)
    sent: int = 0  # characters of ``text`` already handed out (streaming)
    first_token_step: int | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.computed


@dataclass
class Step:
    """The sequences of one step and their segments (same order); ``sample[i]``: sample after segment i."""

    seqs: list[Sequence]
    segments: list[Segment]
    sample: list[bool]


class Scheduler:
    """Waiting and running sequences over one :class:`BlockPool`."""

    def __init__(self, pool: BlockPool, *, max_batch_tokens: int = 256, max_seqs: int = 32, policy: str = "continuous"):
        if policy not in POLICIES:
            raise TrainerError(f"policy={policy!r}: must be one of {POLICIES}")
        if max_batch_tokens < 1 or max_seqs < 1:
            raise TrainerError(f"max_batch_tokens={max_batch_tokens} and max_seqs={max_seqs} must be >= 1")
        self.pool, self.policy = pool, policy
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.table)

    def schedule(self) -> Step:
        """The next step (empty when nothing can run)."""
        while True:
            step = self._try()
            if step.seqs or not self.running:
                return step
            self._preempt(self.running[-1])  # every running one is stuck on the pool: recompute the youngest

    def _try(self) -> Step:
        step, budget = Step([], [], []), self.max_batch_tokens
        for seq in [s for s in self.running if s.pending == 1]:
            if seq not in self.running:
                continue  # preempted for an older one in this loop
            while not self.pool.grow(seq.table, seq.computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running and budget > 0:
                self._add(step, seq, 1)
                budget -= 1
        for seq in [s for s in self.running if s.pending > 1]:
            budget -= self._chunk(step, seq, budget)
        if self.policy == "static" and self.running:
            return step
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            used = self._chunk(step, seq, budget)
            if not used:
                break  # the pool is full: queue
            self.waiting.popleft()
            self.running.append(seq)
            self.running.sort(key=lambda s: s.order)
            budget -= used
        return step

    def _chunk(self, step: Step, seq: Sequence, budget: int) -> int:
        n = min(seq.pending, budget)
        if n < 1 or not self.pool.grow(seq.table, seq.computed + n):
            return 0
        self._add(step, seq, n)
        return n

    def _add(self, step: Step, seq: Sequence, n: int) -> None:
        tokens = seq.tokens
        step.seqs.append(seq)
        step.segments.append(Segment(tokens[seq.computed : seq.computed + n], seq.computed, seq.table))
        step.sample.append(seq.computed + n == len(tokens))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.table)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
