"""``Engine``: requests in, completions out, over a :class:`ModelRunner` and a :class:`Scheduler`.

Two ways in. ``generate(requests)`` runs a list of requests to the end in the calling thread and returns
their completions in order. ``start()`` then ``async for out in engine.submit(request)`` streams one
request's text as it is made, from a background thread that runs steps while there is work; requests
join the running batch as they come (continuous batching), and ``abort`` (or leaving the ``async for``)
frees a request's blocks at once. Each request carries its own :class:`SamplingParams` and its own seeded
generator, so its tokens do not depend on what else runs with it.

Stops: ``max_tokens``; the end-of-text token (not part of the output); a stop string (the text ends before
it; the tokens that made it stay in ``token_ids``). Streamed text holds back what could still become a
stop string or an unfinished UTF-8 character.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import TrainerError
from .runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .scheduler import Sequence as Seq


@dataclass(frozen=True)
class Request:
    """A prompt (text, or token ids) and how to continue it; ``id`` is made up when not given."""

    prompt: str | Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request: ``finish_reason`` is ``"length"``, ``"stop"`` or ``"abort"``."""

    id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass(frozen=True)
class Output:
    """What one step added to a streamed request: new text and tokens, and the reason when it is done."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Timing:
    """When a request arrived, got each token and finished (``time.perf_counter``)."""

    arrived: float
    tokens: list[float] = field(default_factory=list)


class Engine:
    """Generation over ``runner`` (on the driver rank); ``tokenizer`` turns text into ids and back
    (needed for text prompts and stop strings); ``eos_id`` ends a request."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        tokenizer=None,
        eos_id: int | None = None,
        max_batch_tokens: int = 256,
        max_seqs: int = 32,
        policy: str = "continuous",
    ) -> None:
        self.runner, self.tokenizer, self.eos_id = runner, tokenizer, eos_id
        self.scheduler = Scheduler(runner.pool, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, policy=policy)
        self.steps = self.aborted = 0
        self.timings: dict[str, Timing] = {}
        self._ids = itertools.count()
        self._listeners: dict[str, Callable[[Output], None]] = {}
        self._inbox: list[tuple[str, Seq]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def max_len(self) -> int:
        return self.runner.cfg.max_seq_len

    def sequence(self, request: Request) -> Seq:
        """``request`` checked (prompt, length, pool) and made into a sequence; ``TrainerError`` names the field."""
        params = request.params
        if isinstance(request.prompt, str):
            if self.tokenizer is None:
                raise TrainerError("prompt: text needs a tokenizer; give token ids")
            prompt = list(self.tokenizer.encode(request.prompt))
        else:
            prompt = [int(t) for t in request.prompt]
        vocab = self.runner.cfg.vocab_size
        if not prompt:
            raise TrainerError("prompt: empty; give at least one token")
        if any(not 0 <= t < vocab for t in prompt):
            raise TrainerError(f"prompt: token ids must be in [0, {vocab})")
        if len(prompt) >= self.max_len:
            raise TrainerError(f"prompt: {len(prompt)} tokens; the model's context is {self.max_len}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise TrainerError(
                f"max_tokens: {params.max_tokens} after a prompt of {len(prompt)} tokens passes the context "
                f"of {self.max_len}; at most {self.max_len - len(prompt)}"
            )
        pool = self.runner.pool
        if pool.blocks_for(len(prompt) + params.max_tokens) > pool.num_blocks:
            raise TrainerError(f"max_tokens: prompt and output need more than the KV pool's {pool.num_blocks} blocks")
        if params.stop and self.tokenizer is None:
            raise TrainerError("stop: stop strings need a tokenizer")
        generator = torch.Generator(self.runner.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        rid = request.id or f"req-{next(self._ids)}"
        self.timings[rid] = Timing(time.perf_counter())
        return Seq(rid, next(self._ids), prompt, params, generator)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Run ``requests`` to the end in this thread (the background loop must not be running)."""
        if self._thread is not None:
            raise TrainerError("generate() runs without the background loop; use submit() after start()")
        seqs = [self.sequence(r) for r in requests]
        for seq in seqs:
            self.scheduler.add(seq)
        while self.scheduler.has_work():
            self.step()
        return [self.completion(s) for s in seqs]

    def completion(self, seq: Seq) -> Completion:
        return Completion(seq.id, seq.prompt, list(seq.output), seq.text, seq.finish_reason or "abort")

    def step(self) -> list[tuple[Seq, list[int]]]:
        """One model step; returns the sequences that got tokens or finished, with their new tokens."""
        step = self.scheduler.schedule()
        if not step.seqs:
            return []
        logits = self.runner.run(step.segments, step.sample)
        self.steps += 1
        now, changed, row = time.perf_counter(), [], 0
        for seq, segment, sampled in zip(step.seqs, step.segments, step.sample):
            seq.computed += len(segment.ids)
            if not sampled:
                continue
            seen = seq.tokens if seq.params.repetition_penalty != 1 else []
            token = sample(logits[row], seq.params, seq.generator, seen)
            row += 1
            new = self._accept(seq, token)
            self.timings[seq.id].tokens.append(now)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            changed.append((seq, new))
        return changed

    def _accept(self, seq: Seq, token: int) -> list[int]:
        """Add ``token`` to ``seq`` and apply the stops; the tokens added."""
        params = seq.params
        if token == self.eos_id and not params.ignore_eos:
            seq.finish_reason = "stop"
            return []
        seq.output.append(token)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, seq.finish_reason = text[:cut], "stop"
            seq.text = text
        if seq.finish_reason is None and len(seq.output) >= params.max_tokens:
            seq.finish_reason = "length"
        return [token]

    def _delta(self, seq: Seq) -> str:
        """The text of ``seq`` not yet handed out that can no longer change."""
        text, end = seq.text, len(seq.text)
        if seq.finish_reason is None:
            while end > seq.sent and text[end - 1] == "\ufffd":
                end -= 1
            for k in range(min(end - seq.sent, max((len(s) for s in seq.params.stop), default=1) - 1), 0, -1):
                if any(s.startswith(text[end - k : end]) for s in seq.params.stop):
                    end -= k
                    break
        out, seq.sent = text[seq.sent : end], max(seq.sent, end)
        return out

    # the background loop and the async API

    def start(self) -> None:
        """Start the background loop that ``submit`` feeds."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="trainer-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background loop (unfinished requests end with ``abort``) and release TP followers."""
        if self._thread is not None:
            with self._cv:
                self._closing = True
                self._cv.notify()
            self._thread.join()
            self._thread = None
        else:
            self.runner.stop()

    def submit(self, request: Request) -> AsyncIterator[Output]:
        """Check ``request`` now (``TrainerError`` names a bad field) and return the stream of its outputs
        (``async for``); the request joins the running batch when the stream is first read. Leaving the
        stream early aborts the request and frees its blocks."""
        if self._thread is None:
            raise TrainerError("the engine's loop is not running: call start() first")
        return self._stream(self.sequence(request))

    async def _stream(self, seq: Seq) -> AsyncIterator[Output]:
        queue: asyncio.Queue[Output] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._listeners[seq.id] = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
        self._post("add", seq)
        done = False
        try:
            while not done:
                out = await queue.get()
                done = out.finish_reason is not None
                yield out
        finally:
            if not done:
                self._post("abort", seq)

    def abort(self, seq: Seq) -> None:
        self._post("abort", seq)

    def stats(self) -> dict[str, int]:
        s = self.scheduler
        pool = self.runner.pool
        return {
            "running": len(s.running), "waiting": len(s.waiting), "free_blocks": pool.free,
            "total_blocks": pool.num_blocks, "steps": self.steps, "preemptions": s.preemptions, "aborted": self.aborted,
        }  # fmt: skip

    def _post(self, what: str, seq: Seq) -> None:
        with self._cv:
            self._inbox.append((what, seq))
            self._cv.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self.scheduler.has_work() or self._closing):
                        self._cv.wait()
                    if self._closing:
                        break
                    inbox, self._inbox = self._inbox, []
                for what, seq in inbox:
                    if what == "add":
                        self.scheduler.add(seq)
                    elif seq.finish_reason is None:
                        seq.finish_reason = "abort"
                        self.aborted += 1
                        self.scheduler.finish(seq)
                        self._listeners.pop(seq.id, None)
                        self.timings.pop(seq.id, None)
                if self.scheduler.has_work():
                    self._run_step()
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                self._notify(seq, [])
        finally:
            self.runner.stop()

    def _run_step(self) -> None:
        try:
            changed = self.step()
        except Exception:  # a failed step ends the requests in it, not the server
            traceback.print_exc()
            for seq in [*self.scheduler.running]:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
                self._notify(seq, [])
            return
        for seq, new in changed:
            self._notify(seq, new)

    def _notify(self, seq: Seq, new: list[int]) -> None:
        if seq.finish_reason is not None:
            self.timings.pop(seq.id, None)  # a long-running loop keeps no record of finished requests
        listener = self._listeners.get(seq.id)
        if listener is None:
            return
        if seq.finish_reason is not None:
            self._listeners.pop(seq.id, None)
        listener(Output(seq.id, self._delta(seq), new, seq.finish_reason, len(seq.prompt), len(seq.output)))
