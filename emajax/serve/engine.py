"""The served model: parses OpenAI requests, hands them to the batcher, formats what comes back."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from emajax.generate import Generator, batch_buckets
from emajax.serve.batcher import Batcher, Job
from emajax.serve.openai_format import Formatter, Stream
from emajax.serve.protocol import (CHAT_DEFAULT_MAX_TOKENS, MAX_N, Params, Prompt, Served, generation_defaults,
                                   parse_chat, parse_completion)


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
    the first request is taken; ``generation_config``: sampling defaults for fields a request leaves out
    (default: the model directory's ``generation_config.json``). Thread-safe: :meth:`start` may be called
    from any thread; the HTTP layer (``emajax.serve.app``) adds admission control and disconnects."""

    def __init__(self, loaded: Any, name: str, *, max_n: int = MAX_N,
                 default_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS, max_batch_rows: int = 8,
                 batch_window_s: float = 0.05, warmup: Sequence[tuple[int, int, int]] = (),
                 generation_config: dict | None = None):
        self.loaded = loaded
        self.name = name
        tok = loaded.tokenizer
        self.generator = Generator(loaded.model, tok)
        defaults = generation_defaults(getattr(loaded, "model_dir", None)) if generation_config is None \
            else dict(generation_config)
        self.served = Served(name, tok, loaded.model.cfg.max_position_embeddings, max_n, default_max_tokens,
                             tuple(self.generator.eos_ids), defaults, Served.longest_token(tok))
        self.batcher = Batcher(self.generator, max_batch_rows=max_batch_rows, window_s=batch_window_s, warmup=warmup)
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

    def parse(self, route: str, body: Any) -> tuple[list[Prompt], Params]:
        """A request body of ``route`` ("chat" or "completion") checked and tokenized (raises RequestError)."""
        return (parse_chat if route == "chat" else parse_completion)(body, self.served)

    def start(self, parsed: tuple[list[Prompt], Params],
              listener: Callable[[Any], None] | None = None) -> Job:
        """Queue a parsed request for the next batch; its events go to ``listener`` (see ``batcher.Job``)."""
        job = Job(*parsed, tokenizer=self.loaded.tokenizer, listener=listener)
        self.batcher.submit(job)
        return job

    def response(self, route: str, job: Job) -> dict:
        """The finished job's response body (raises its RequestError if it failed)."""
        if job.error is not None:
            raise job.error
        return (self.formatter.chat_response if route == "chat" else self.formatter.completion_response)(job)

    def stream(self, route: str, job: Job) -> Stream:
        return (self.formatter.chat_stream if route == "chat" else self.formatter.completion_stream)(job)

    def complete(self, req: Any, route: str = "chat") -> dict:
        """The body of a /v1/chat/completions (or ``route="completion"``: /v1/completions) response, blocking."""
        job = self.start(self.parse(route, req))
        job.done.wait()
        return self.response(route, job)

    def complete_text(self, req: Any) -> dict:
        """The body of a /v1/completions response, blocking."""
        return self.complete(req, "completion")
