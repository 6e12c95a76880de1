"""Concurrent requests -> shared ``generate_rows`` calls, their tokens streamed back as they are made.

One thread owns the model. It waits for a request, keeps gathering while others keep arriving (until
``window_s`` passes without a new one, at most ``WINDOW_CAP`` windows in all) or until ``max_batch_rows``
rows are queued, and runs every choice of every gathered request as one row of one compiled program,
each row with its own budget, temperature, top-p, seed and logprobs. After each decoding step the program calls back with the new
tokens: each request's :class:`Job` decodes its rows' text, cuts stop strings (stopping those rows on
the device), and queues :class:`Delta` events that the HTTP thread turns into stream chunks. A request
whose rows are all done is answered at once, while the rest of its batch continues. Requests that
arrive during a batch wait for the next one.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from emajax.generate import GenerationError, SampleRow, StepOutput, generate_rows, pad_token_id
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
    """One generated row of a job: its tokens and their logprobs, the visible text, why it ended."""

    def __init__(self, index: int, prompt: int, max_tokens: int):
        self.index = index
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.logprobs: list[tuple[float, np.ndarray, np.ndarray]] = []  # (logprob, top logprobs, top ids)
        self.text = ""  # special tokens dropped, cut before a stop string
        self.sent = 0  # characters of text already handed out as deltas
        self.finish: str | None = None


class Job:
    """One HTTP request in flight: its prompts x ``n`` choices, its events, its end."""

    _ids = itertools.count()

    def __init__(self, prompts: Sequence[Prompt], params: Params, *, tokenizer: Any, eos_ids: Sequence[int]):
        self.prompts = list(prompts)
        self.params = params
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_ids)
        self.choices = [Choice(i * params.n + c, i, params.max_tokens[i])
                        for i in range(len(prompts)) for c in range(params.n)]
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop string could still claim
        self.events: queue.Queue[Delta | None] = queue.Queue()
        self.done = threading.Event()
        self.error: RequestError | None = None
        self.cancelled = False  # set by the HTTP thread when the client goes away
        self.arrived = time.monotonic()
        self.created = int(time.time())
        self.seq = next(self._ids)

    @property
    def n_rows(self) -> int:
        return len(self.choices)

    def row(self, ch: Choice) -> SampleRow:
        p = self.params
        return SampleRow(self.prompts[ch.prompt].ids, ch.max_tokens, p.temperature, p.top_p, p.seed,
                         ch.index, p.logprobs)

    def advance(self, ch: Choice, token: int, logprob: tuple[float, np.ndarray, np.ndarray] | None) -> None:
        """Append one generated token to ``ch``: update its text, detect its end, queue the delta."""
        first = len(ch.tokens)
        ch.tokens.append(token)
        if logprob is not None:
            ch.logprobs.append(logprob)
        eos = token in self.eos
        text = self.tokenizer.decode(ch.tokens[:-1] if eos else ch.tokens, skip_special_tokens=True)
        finish = "stop" if eos else ("length" if len(ch.tokens) >= ch.max_tokens else None)
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            text, finish = text[:min(hits)], "stop"
        ch.text = text
        if finish is None:
            # Hold back what a stop string could still claim and an unfinished multi-byte character.
            ready = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
            ready = min(ready, len(text) - self.hold)
        else:
            ready = len(text)
        delta = text[ch.sent:ready] if ready > ch.sent else ""
        ch.sent = max(ch.sent, ready)
        ch.finish = finish
        self.events.put(Delta(ch.index, delta, first, len(ch.tokens), finish))
        if finish is not None and all(c.finish is not None for c in self.choices):
            self._end()

    def fail(self, err: RequestError) -> None:
        if not self.done.is_set():
            self.error = err
            self._end()

    def close(self) -> None:
        """After the batch: choices the device ended without a final callback end as 'length'."""
        for ch in self.choices:
            if ch.finish is None:
                ch.finish = "length"
                self.events.put(Delta(ch.index, ch.text[ch.sent:], len(ch.tokens), len(ch.tokens), "length"))
                ch.sent = len(ch.text)
        if not self.done.is_set():
            self._end()

    def _end(self) -> None:
        self.events.put(None)
        self.done.set()

    def iter_events(self) -> Iterator[Delta]:
        """The deltas in order, until the job ends (then check ``error``)."""
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

    def __init__(self, model: Any, tokenizer: Any, eos_ids: Sequence[int], *, max_batch_rows: int = 8,
                 window_s: float = 0.05, lora_scale: float = 1.0,
                 warmup: Sequence[tuple[int, int, int]] = ()):
        if max_batch_rows < 1 or window_s < 0:
            raise ValueError(f"need max_batch_rows >= 1 and window_s >= 0, got {max_batch_rows}, {window_s}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.max_batch_rows = max_batch_rows
        self.window_s = window_s
        self.lora_scale = lora_scale
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
        pad = pad_token_id(self.tokenizer, self.eos_ids)
        for i, (b, p, n) in enumerate(self._warmup):
            t0 = time.perf_counter()
            rows = [SampleRow([pad] * p, n, 1.0, 0.9, 0, r, True) for r in range(b)]
            generate_rows(self.model, self.tokenizer, rows, eos_ids=self.eos_ids, lora_scale=self.lora_scale,
                          on_step=lambda out: np.ones(len(out.tokens_b), bool))
            log.info("warm-up %d/%d: %d rows x %d prompt x %d new tokens compiled in %.1f s", i + 1, len(self._warmup),
                     b, p, n, time.perf_counter() - t0)

    def _take(self) -> list[Job]:
        """The next batch: waits for a job, then gathers until ``window_s`` passes without a new one (at most
        ``WINDOW_CAP`` windows after the oldest arrived) or a full batch is queued."""
        with self._cv:
            while not self._queue and not self._closed:
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

    def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
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
            generate_rows(self.model, self.tokenizer, [job.row(ch) for job, ch in owners], eos_ids=self.eos_ids,
                          lora_scale=self.lora_scale, on_step=on_step)
        except GenerationError as e:  # parse-time checks should have caught it; answer, don't crash
            for job in jobs:
                job.fail(RequestError(400, str(e)))
        except Exception:
            log.exception("batch failed")
            for job in jobs:
                job.fail(RequestError(500, "internal error while generating (see the server log)"))
        for job in jobs:
            job.close()
        self.stats.record_tokens(made[0])
        log.info("batch: %d requests, %d rows, %d tokens in %.2f s", len(jobs), len(owners), made[0],
                 time.perf_counter() - t0)
