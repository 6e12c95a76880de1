"""Concurrent requests -> shared ``generate_rows`` calls, their tokens streamed back as they are made.

One thread owns the model. It waits for a request, keeps gathering while others keep arriving (until
``window_s`` passes without a new one, at most ``WINDOW_CAP`` windows in all) or until ``max_batch_rows``
rows are queued, and runs every choice of every gathered request as one row of one compiled program
(the batcher's :class:`~emajax.generate.Generator`), each row with its own sampling settings. After each
decoding step the program calls back with the new tokens: each request's :class:`Job` detokenizes its
rows' new text, cuts stop strings (stopping those rows on the device), and hands :class:`Delta` events to
its listener (the HTTP layer, which turns them into stream chunks). A request whose rows are all done is
answered at once, while the rest of its batch continues; a cancelled request (its client went away) has
its rows stopped at the next step. Requests that arrive during a batch wait for the next one. A row that
fails (its checks, its text handling) fails its own request only: the rest of the batch goes on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from emajax.generate import GenerationError, Generator, SampleRow, StepOutput, check_row
from emajax.serve.protocol import Params, Prompt, RequestError

log = logging.getLogger("emajax.serve")

WINDOW_CAP = 4  # a burst of arrivals keeps the window open, up to this many windows after its first request


class Delta(NamedTuple):
    """New output of one choice: ``text`` to append and its tokens ``[first_token, last_token)``;
    ``finish`` ("stop", "length") once the choice is complete."""

    choice: int
    text: str
    first_token: int
    last_token: int
    finish: str | None


class Choice:
    """One generated row of a job: its tokens and their logprobs, the visible text, why it ended.

    Text is detokenized incrementally (as vLLM and TGI do): each step decodes only the tokens from
    ``prefix`` on, and the text they add beyond the tokens ``[prefix, read)`` is the new text, so the cost
    per step does not grow with the length; a step whose text ends in an unfinished character waits."""

    def __init__(self, index: int, prompt: int, max_tokens: int):
        self.index = index
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.logprobs: list[tuple[float, np.ndarray, np.ndarray]] = []  # (logprob, top logprobs, top ids)
        self.text = ""  # special tokens dropped, cut before a stop string
        self.sent = 0  # characters of text already handed out as deltas
        self.finish: str | None = None
        self.prefix = 0  # tokens [prefix, read) decode to the text's tail (the incremental window)
        self.read = 0
        self.offsets: list[int] = []  # per token: characters of text before it (legacy logprobs' text_offset)

    def detokenize(self, tokenizer: Any, upto: int, final: bool) -> str:
        """The text tokens[read:upto] add (all of it when ``final``, even an unfinished character)."""
        window = self.tokens[self.prefix:upto]
        before = tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        now = tokenizer.decode(window, skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, upto
            return now[len(before):]
        if final and len(now) > len(before):
            return now[len(before):]
        return ""


class Job:
    """One HTTP request in flight: its prompts x ``n`` choices, its events, its end.

    Events (:class:`Delta`, then None at the end) go to ``listener`` (called on the model thread; the
    HTTP layer hands them to its event loop); without one they queue on ``events`` (``iter_events``)."""

    _ids = itertools.count()

    def __init__(self, prompts: Sequence[Prompt], params: Params, *, tokenizer: Any,
                 listener: Callable[[Delta | None], None] | None = None):
        self.prompts = list(prompts)
        self.params = params
        self.tokenizer = tokenizer
        self.stops = frozenset(params.stop_ids)
        self.eos = frozenset(params.eos_ids)
        self.choices = [Choice(i * params.n + c, i, params.max_tokens[i])
                        for i in range(len(prompts)) for c in range(params.n)]
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop string could still claim
        self.events: queue.Queue[Delta | None] = queue.Queue()
        self.listener = listener or self.events.put
        self.done = threading.Event()
        self.error: RequestError | None = None
        self.cancelled = False  # set when the client goes away: its rows stop at the next step
        self.arrived = time.monotonic()
        self.created = int(time.time())
        self.seq = next(self._ids)

    @property
    def n_rows(self) -> int:
        return len(self.choices)

    def row(self, ch: Choice) -> SampleRow:
        p = self.params
        return SampleRow(self.prompts[ch.prompt].ids, ch.max_tokens, p.temperature, p.top_p, p.seed, ch.index,
                         p.logprobs, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                         presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                         min_tokens=p.min_tokens, stop_ids=p.stop_ids)

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, ev: Delta | None) -> None:
        try:
            self.listener(ev)
        except RuntimeError:  # the listener's event loop is gone (server shutting down): nobody is waiting
            self.cancelled = True

    def advance(self, ch: Choice, token: int, logprob: tuple[float, np.ndarray, np.ndarray] | None) -> None:
        """Append one generated token to ``ch``: update its text, detect its end, queue the delta."""
        first = len(ch.tokens)
        ch.tokens.append(token)
        if logprob is not None:
            ch.logprobs.append(logprob)
        stopped = token in self.stops
        finish = "stop" if stopped else ("length" if len(ch.tokens) >= ch.max_tokens else None)
        upto = len(ch.tokens) - 1 if stopped and token in self.eos else len(ch.tokens)  # EOS is never text
        old = len(ch.text)
        ch.offsets.append(old)
        ch.text += ch.detokenize(self.tokenizer, upto, final=finish is not None)
        if self.params.stop and len(ch.tokens) > self.params.min_tokens:  # vLLM: no stop strings before min_tokens
            start = max(0, old - self.hold)
            hits = [i for i in (ch.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                ch.text, finish = ch.text[:min(hits)], "stop"
        if finish is None:
            # Hold back what a stop string could still claim.
            ready = max(len(ch.text) - self.hold, 0)
        else:
            ready = len(ch.text)
        delta = ch.text[ch.sent:ready] if ready > ch.sent else ""
        ch.sent = max(ch.sent, ready)
        ch.finish = finish
        self._emit(Delta(ch.index, delta, first, len(ch.tokens), finish))
        if finish is not None and all(c.finish is not None for c in self.choices):
            self._end()

    def fail(self, err: RequestError) -> None:
        if not self.done.is_set():
            self.error = err
            self._end()

    def close(self) -> None:
        """After the batch: choices the device ended without a final callback end as 'length'."""
        if self.done.is_set():
            return
        for ch in self.choices:
            if ch.finish is None:
                ch.finish = "length"
                self._emit(Delta(ch.index, ch.text[ch.sent:], len(ch.tokens), len(ch.tokens), "length"))
                ch.sent = len(ch.text)
        self._end()

    def _end(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self._emit(None)

    def iter_events(self) -> Iterator[Delta]:
        """The deltas in order, until the job ends (then check ``error``); for jobs without a listener."""
        while True:
            ev = self.events.get()
            if ev is None:
                return
            yield ev

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class BatchStats:
    """Counters of the batcher (served at /metrics): generate calls, and how many requests and rows they held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generate_calls = 0
        self.requests = 0
        self.rows = 0
        self.tokens = 0
        self.requests_per_call: collections.Counter[int] = collections.Counter()

    def record_call(self, n_requests: int, n_rows: int) -> None:
        """Counted when the call starts (its requests may be answered before it ends)."""
        with self._lock:
            self.generate_calls += 1
            self.requests += n_requests
            self.rows += n_rows
            self.requests_per_call[n_requests] += 1

    def record_tokens(self, n_tokens: int) -> None:
        with self._lock:
            self.tokens += n_tokens

    def snapshot(self) -> dict:
        with self._lock:
            return {"generate_calls": self.generate_calls, "requests": self.requests, "rows": self.rows,
                    "generated_tokens": self.tokens, "max_requests_per_call": max(self.requests_per_call, default=0),
                    "requests_per_call": dict(sorted(self.requests_per_call.items()))}


class Batcher:
    """The one thread that runs the model: gathers queued jobs into batches and streams their steps back.

    ``warmup`` shapes (batch rows, prompt tokens, new tokens) are compiled first, before any request
    is taken; requests that arrive meanwhile wait (``ready`` is set when it is done)."""

    def __init__(self, generator: Generator, *, max_batch_rows: int = 8, window_s: float = 0.05,
                 warmup: Sequence[tuple[int, int, int]] = ()):
        if max_batch_rows < 1 or window_s < 0:
            raise ValueError(f"need max_batch_rows >= 1 and window_s >= 0, got {max_batch_rows}, {window_s}")
        self.generator = generator
        self.max_batch_rows = max_batch_rows
        self.window_s = window_s
        self.stats = BatchStats()
        self.ready = threading.Event()
        self._warmup = list(warmup)
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="emajax-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RequestError(503, "the server is shutting down")
            self._queue.append(job)
            self._cv.notify()

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for job in pending:
            job.fail(RequestError(503, "the server is shutting down"))

    def _loop(self) -> None:
        try:
            self._warm_up()
        except Exception:  # a failed warm-up only costs the first requests their compile
            log.exception("warm-up failed")
        self.ready.set()
        while True:
            jobs = self._take()
            if not jobs:
                return
            try:
                self._run(jobs)
            except Exception:  # never let the model thread die: fail the batch, keep serving
                log.exception("batch failed")
                for job in jobs:
                    job.fail(RequestError(500, "internal error while generating (see the server log)"))

    def _warm_up(self) -> None:
        pad = self.generator.pad_id
        for i, (b, p, n) in enumerate(self._warmup):
            t0 = time.perf_counter()
            rows = [SampleRow([pad] * p, n, 1.0, 0.9, 0, r, True) for r in range(b)]
            self.generator.rows(rows, on_step=lambda out: np.ones(len(out.tokens_b), bool))
            log.info("warm-up %d/%d: %d rows x %d prompt x %d new tokens compiled in %.1f s", i + 1, len(self._warmup),
                     b, p, n, time.perf_counter() - t0)

    def _take(self) -> list[Job]:
        """The next batch: waits for a job, then gathers until ``window_s`` passes without a new one (at most
        ``WINDOW_CAP`` windows after the oldest arrived) or a full batch is queued. Cancelled jobs are dropped."""
        with self._cv:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft().close()
                if self._queue or self._closed:
                    break
                self._cv.wait()
            if self._closed:
                return []
            while sum(j.n_rows for j in self._queue) < self.max_batch_rows and not self._closed:
                deadline = min(self._queue[-1].arrived + self.window_s,
                               self._queue[0].arrived + WINDOW_CAP * self.window_s)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._closed:
                return []
            jobs = [self._queue.popleft()]
            rows = jobs[0].n_rows
            while self._queue and rows + self._queue[0].n_rows <= self.max_batch_rows:
                rows += self._queue[0].n_rows
                jobs.append(self._queue.popleft())
            return jobs

    def _checked(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose every row passes the generator's checks; each other one fails alone (400)."""
        cfg = self.generator.model.cfg
        ok = []
        for job in jobs:
            if job.cancelled:
                job.close()
                continue
            try:
                for ch in job.choices:
                    check_row(ch.index, job.row(ch), cfg)
            except GenerationError as e:
                job.fail(RequestError(400, str(e)))
                continue
            ok.append(job)
        return ok

    def _run(self, jobs: list[Job]) -> None:
        jobs = self._checked(jobs)
        owners = [(job, ch) for job in jobs for ch in job.choices]
        if not owners:
            return
        made = [0]

        def on_step(out: StepOutput) -> np.ndarray:
            stop_b = np.zeros(len(owners), bool)
            for r, (job, ch) in enumerate(owners):
                if ch.finish is None and not job.cancelled and not job.done.is_set():
                    lp = ((float(out.logprob_b[r]), out.top_logprob_bk[r], out.top_id_bk[r])
                          if job.params.logprobs else None)
                    try:
                        job.advance(ch, int(out.tokens_b[r]), lp)
                    except Exception as e:  # one request's text handling must not end the others
                        log.exception("request failed while streaming")
                        job.fail(RequestError(500, f"internal error: {type(e).__name__}"))
                    made[0] += 1
                stop_b[r] = ch.finish is not None or job.cancelled or job.done.is_set()
            return stop_b

        t0 = time.perf_counter()
        self.stats.record_call(len(jobs), len(owners))
        try:
            self.generator.rows([job.row(ch) for job, ch in owners], on_step=on_step)
        except Exception:  # the checks passed: this is the server's fault, not a request's
            log.exception("batch failed")
            for job in jobs:
                job.fail(RequestError(500, "internal error while generating (see the server log)"))
        for job in jobs:
            job.close()
        self.stats.record_tokens(made[0])
        log.info("batch: %d requests, %d rows, %d tokens in %.2f s", len(jobs), len(owners), made[0],
                 time.perf_counter() - t0)
