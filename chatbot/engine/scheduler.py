"""The decode loop: continuous batching, one decoder step at a time, in one thread.

BentoML's batch dispatcher runs one whole batch at a time per worker, so a reply that
arrives one second into a twelve-second batch waits for all of it. This loop schedules
per step instead, as vLLM and TGI do (neither does it for encoder-decoder models nor
keeps beam search in the loop; this one does both):

1. waiting replies are admitted while the row budget has room (a beam search takes
   one row per beam), and their prompts are run (``ModelStep.admit``);
2. one decoder step runs for every row of every running reply;
3. each reply applies its own decoding to its rows (``chatbot.engine.decoding``), new
   tokens go to its sink at once (streams), beams reorder their rows;
4. finished, cancelled and failed replies leave at once; the rows behind them move up.

The loop owns the model: nothing else runs it while the loop lives, so there is no
lock around the model and a step never waits for anything but the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import torch

from chatbot.engine.decoding import Decoding, TokenChoice
from chatbot.engine.errors import QueueFull
from chatbot.engine.model_step import ModelStep

T = TypeVar("T")
logger = logging.getLogger(__name__)

RELEASE_AFTER_IDLE_S = 0.5
"""How long the loop waits with nothing to do before it gives its key/value buffers
back (``ModelStep.release``): long enough that back-to-back requests reuse them,
short enough that memory measured between bursts is the model's alone."""


class ReplySink(Protocol):
    """Where a reply's tokens go; called from the loop's thread."""

    def tokens(self, ids: list[int], choices: Sequence[TokenChoice]) -> None:
        """New tokens of a single-row reply, as soon as they exist (with their
        log-probabilities, when asked for)."""

    def finish(self, output: list[int], choices: Sequence[TokenChoice]) -> None:
        """The whole reply's new token ids (and log-probabilities)."""

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> bool:
        """True once nobody wants the reply any more (the client left)."""


class LoopObserver(Protocol):
    """What the loop reports, for metrics (``chatbot.http.loop_metrics``)."""

    def admitted(self, queued_s: float, prompt_tokens: int) -> None: ...

    def step(self, rows: int, running: int, waiting: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def next_token(self, gap_s: float) -> None: ...

    def finished(self, total_s: float) -> None: ...

    def ended(self, reason: str) -> None:
        """Why a reply left the loop: its ``finish_reason`` ("stop", "length"), "abort"
        (nobody wanted it any more) or "error"."""


class _Unobserved:
    def admitted(self, queued_s: float, prompt_tokens: int) -> None: ...
    def step(self, rows: int, running: int, waiting: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, gap_s: float) -> None: ...
    def finished(self, total_s: float) -> None: ...
    def ended(self, reason: str) -> None: ...


@dataclass(eq=False)
class Job:
    """One reply in the loop. ``start_decoding`` is called in the loop's thread."""

    prompt: list[int]
    rows: int
    start_decoding: Callable[[], Decoding]
    sink: ReplySink
    finish_reason: Callable[[list[int]], str]  # of a finished reply, from its new ids
    arrived: float = field(default_factory=time.perf_counter)
    decoding: Decoding | None = None
    first: int = 0
    sent: int = 0
    last_token_at: float = 0.0
    error: BaseException | None = None


class DecodeLoop:
    """Runs the loop in a daemon thread; ``submit`` is safe from any thread."""

    def __init__(
        self,
        step: ModelStep,
        max_rows: int,
        max_waiting: int,
        observer: LoopObserver | None = None,
    ) -> None:
        self.step = step
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.observer: LoopObserver = observer or _Unobserved()
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if job.rows > self.max_rows:
            raise ValueError(f"a reply needs {job.rows} rows; the loop has {self.max_rows}")
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull
            self.waiting.append(job)
            self._wake.notify()

    @property
    def rows_in_use(self) -> int:
        return sum(job.rows for job in self.running)

    def close(self) -> None:
        """Stop after the current step; replies still waiting or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                released = False
                while not (self.waiting or self.running or self._closed):
                    # Idle: give the buffers back once (nothing else touches them), then
                    # sleep until woken rather than every RELEASE_AFTER_IDLE_S.
                    timeout = None if released else RELEASE_AFTER_IDLE_S
                    if not self._wake.wait(timeout):
                        self.step.release()
                        released = True
                if self._closed:
                    break
            try:
                with torch.inference_mode():
                    self._iterate()
            except Exception as error:  # a bug or out of memory: nobody may hang on it
                logger.exception("decode step failed; failing the replies in the loop")
                self._fail_all(error, waiting=False)
        self._fail_all(RuntimeError("the decode loop was stopped"), waiting=True)

    def _fail_all(self, error: Exception, waiting: bool) -> None:
        jobs = self.running
        self.running = []
        if waiting:
            with self._wake:
                jobs, self.waiting = [*self.waiting, *jobs], deque()
        for job in jobs:
            self._guard(job, partial(job.sink.fail, error))

    def _iterate(self) -> None:
        self._admit()
        self._retire()
        rows = self.rows_in_use
        if self.running:
            self._decode()
            self._retire()
        self.observer.step(rows, len(self.running), len(self.waiting))

    def _admit(self) -> None:
        """Waiting replies take free rows, in arrival order (no overtaking, so a big
        beam search is never starved by a stream of small replies)."""
        admitted: list[Job] = []
        with self._wake:
            rows = self.rows_in_use
            while self.waiting and rows + self.waiting[0].rows <= self.max_rows:
                job = self.waiting.popleft()
                job.first, rows = rows, rows + job.rows
                admitted.append(job)
        if not admitted:
            return
        self.step.reserve(rows)
        now = time.perf_counter()
        for job in admitted:
            self.observer.admitted(now - job.arrived, len(job.prompt))
            job.decoding = self._guard(job, job.start_decoding)
        self.running += admitted  # failed ones leave at the next _retire, told why
        ready = [job for job in admitted if job.error is None]
        if ready:
            self._advance(self._prefill(ready))

    def _prefill(self, jobs: list[Job]) -> list[tuple[Job, torch.Tensor | None]]:
        """Each job with the logits of its first token (None when the first decode
        step gives them). A prompt the model cannot take fails its own job only."""
        try:
            logits = self.step.admit(
                [j.prompt for j in jobs], [j.first for j in jobs], [j.rows for j in jobs]
            )
        except Exception:
            if len(jobs) == 1:
                raise
            return [pair for job in jobs for pair in self._prefill_alone(job)]
        if logits is None:
            return [(job, None) for job in jobs]
        return list(zip(jobs, logits.split([j.rows for j in jobs]), strict=True))

    def _prefill_alone(self, job: Job) -> list[tuple[Job, torch.Tensor | None]]:
        try:
            return self._prefill([job])
        except Exception as error:
            job.error = error
            return []

    def _decode(self) -> None:
        decodings = [job.decoding for job in self.running if job.decoding is not None]
        tokens = torch.tensor(
            [token for d in decodings for token in d.last_tokens()], device=self.step.device
        )
        positions = torch.tensor(
            [d.length - 1 for d in decodings for _ in range(d.rows)], device=self.step.device
        )
        try:
            logits = self.step.decode(tokens, positions, [d.rows for d in decodings])
        except Exception as error:  # the model itself failed: every running reply hears of it
            for job in self.running:
                job.error = error
            return
        self._advance([(job, logits[job.first : job.first + job.rows]) for job in self.running])

    def _advance(self, pairs: list[tuple[Job, torch.Tensor | None]]) -> None:
        """Each job takes its rows' logits (None: nothing to take yet)."""
        now = time.perf_counter()
        for job, rows in pairs:
            decoding = job.decoding
            if job.error is not None or decoding is None or rows is None:
                continue
            parents = self._guard(job, partial(decoding.advance, rows))
            if isinstance(parents, torch.Tensor) and job.error is None:
                self.step.reorder(job.first, parents)
            if job.error is None:
                self._deliver(job, decoding, now)

    def _deliver(self, job: Job, decoding: Decoding, now: float) -> None:
        """Stream single-row replies' new tokens; note first-token and gap times."""
        if job.sent == 0:
            self.observer.first_token(now - job.arrived)
        else:
            self.observer.next_token(now - job.last_token_at)
        job.last_token_at = now
        if decoding.rows == 1:
            output = decoding.output()
            fresh = output[job.sent :]
            if fresh:
                self._guard(job, partial(job.sink.tokens, fresh, decoding.choices[job.sent :]))
            job.sent = len(output)
        else:
            job.sent += 1

    def _retire(self) -> None:
        """Finished, failed and cancelled replies leave; later rows move up."""
        kept: list[Job] = []
        for job in self.running:
            decoding = job.decoding
            if job.error is not None:
                self.observer.ended("error")
                self._guard(job, partial(job.sink.fail, job.error))
            elif decoding is not None and decoding.finished:
                output = decoding.output()
                self.observer.finished(time.perf_counter() - job.arrived)
                self.observer.ended(job.finish_reason(output))
                self._guard(job, partial(job.sink.finish, output, decoding.choices))
            elif job.sink.cancelled():
                self.observer.ended("abort")
            else:
                kept.append(job)
        if len(kept) == len(self.running):
            return
        source: list[int] = []
        target: list[int] = []
        row = 0
        for job in kept:
            if job.first != row:
                source += range(job.first, job.first + job.rows)
                target += range(row, row + job.rows)
                job.first = row
            row += job.rows
        if source:
            self.step.move(source, target)
        self.running = kept

    @staticmethod
    def _guard(job: Job, action: Callable[[], T]) -> T | None:
        """Run ``action`` for ``job``; an error fails that job only (None then)."""
        try:
            return action()
        except Exception as error:
            job.error = error
            return None
