"""The served model: parses OpenAI requests, hands them to the batcher, formats what comes back."""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from emajax.generate import batch_buckets, default_eos_ids
from emajax.serve.batcher import Batcher, Job
from emajax.serve.openai_format import Formatter
from emajax.serve.protocol import (CHAT_DEFAULT_MAX_TOKENS, MAX_N, Params, Prompt, Served, parse_chat,
                                   parse_completion)


def load_model_with_adapter(model: str, adapter: str | os.PathLike | None = None, *, dtype: str = "float32"):
    """``hub.load_model`` (+ a PEFT adapter dir whose LoRA shape is read from its adapter_config.json)."""
    from emajax.models.hf_io import load_peft_adapter, peft_lora_config
    from emajax.models.hub import load_model

    lora = peft_lora_config(adapter) if adapter is not None else None
    loaded = load_model(model, dtype=dtype, param_dtype=dtype, lora=lora)
    if adapter is not None:
        load_peft_adapter(loaded.model, adapter)
    return loaded


def warmup_shapes(max_batch_rows: int, prompt_tokens: Sequence[int], max_tokens: Sequence[int]) -> list[tuple]:
    """The compiled shapes worth warming: every power-of-two batch up to ``max_batch_rows`` for each
    prompt length and token budget (bucketed as ``generate`` buckets them; duplicates dropped)."""
    shapes = []
    b = 1
    while True:
        for p in prompt_tokens:
            for n in max_tokens:
                shape = batch_buckets(b, p, n)
                if shape not in shapes:
                    shapes.append(shape)
        if b >= max_batch_rows:
            return shapes
        b = min(2 * b, max_batch_rows)


class ChatEngine:
    """OpenAI chat and text completions on one loaded model; concurrent requests share generate calls.

    ``max_batch_rows`` rows (choices) at most per call, gathered until ``batch_window_s`` passes without a
    new request (see ``batcher``); ``warmup``: (rows, prompt tokens, new tokens) shapes compiled before
    the first request is taken. Thread-safe: every method may be called from any HTTP thread."""

    def __init__(self, loaded: Any, name: str, *, max_n: int = MAX_N,
                 default_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS, max_batch_rows: int = 8,
                 batch_window_s: float = 0.05, warmup: Sequence[tuple[int, int, int]] = ()):
        self.loaded = loaded
        self.name = name
        tok = loaded.tokenizer
        self.eos_ids = default_eos_ids(loaded.model, tok)
        self.served = Served(name, tok, loaded.model.cfg.max_position_embeddings, max_n, default_max_tokens)
        self.batcher = Batcher(loaded.model, tok, self.eos_ids, max_batch_rows=max_batch_rows,
                               window_s=batch_window_s, warmup=warmup)
        self.formatter = Formatter(tok, name)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "emajax"}]}

    def stats(self) -> dict:
        """Batching counters (generate calls, requests and rows per call, tokens) and the queue length."""
        return dict(self.batcher.stats.snapshot(), queued=self.batcher.queued(), ready=self.batcher.ready.is_set())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the warm-up compiles are done."""
        return self.batcher.ready.wait(timeout)

    def close(self) -> None:
        self.batcher.close()

    def _submit(self, prompts: list[Prompt], params: Params) -> Job:
        job = Job(prompts, params, tokenizer=self.loaded.tokenizer, eos_ids=self.eos_ids)
        self.batcher.submit(job)
        return job

    def _finished(self, job: Job) -> Job:
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def _stream(self, job: Job, chunks: Iterator[dict]) -> Iterator[dict]:
        try:
            yield from chunks
        finally:  # the client went away (or the stream ended): stop its rows at the next step
            if not job.done.is_set():
                job.cancelled = True

    def complete(self, req: Any) -> dict:
        """The body of a /v1/chat/completions response (raises RequestError on bad input)."""
        return self.formatter.chat_response(self._finished(self._submit(*parse_chat(req, self.served))))

    def stream_chat(self, req: Any) -> Iterator[dict]:
        """A streaming /v1/chat/completions: checks the request now (raising RequestError), then the chunks."""
        job = self._submit(*parse_chat(req, self.served))
        return self._stream(job, self.formatter.chat_chunks(job))

    def complete_text(self, req: Any) -> dict:
        """The body of a /v1/completions response."""
        return self.formatter.completion_response(self._finished(self._submit(*parse_completion(req, self.served))))

    def stream_text(self, req: Any) -> Iterator[dict]:
        job = self._submit(*parse_completion(req, self.served))
        return self._stream(job, self.formatter.completion_chunks(job))

