"""OpenAI request bodies -> what the engine runs: prompts as token ids and one :class:`Params`.

Every check happens here, before a request joins a batch, so a bad request is answered alone (an
:class:`RequestError` in OpenAI's error shape) and never disturbs the requests it would have shared a
``generate`` call with. Fields this server cannot honour (tools, penalties, logit bias, ...) are
refused by name rather than silently ignored; unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from emajax.chat import ChatError, render_chat, validate_messages
from emajax.generate import TOP_LOGPROBS

MAX_N = 128
MAX_STOP = 16
CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# field -> the value(s) it may take here (anything else is a 400 naming the field)
_CHAT_UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                     "function_call": (None, "none"), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
                     "frequency_penalty": (None, 0, 0.0), "audio": (None,), "prediction": (None,),
                     "modalities": (None, ["text"])}
_COMPLETION_UNSUPPORTED = {"suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
                           "frequency_penalty": (None, 0, 0.0)}


class RequestError(ValueError):
    """A request answered with ``status`` and OpenAI's error body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class Served(NamedTuple):
    """What request parsing needs to know about the served model."""

    name: str
    tokenizer: Any
    context_limit: int
    max_n: int = MAX_N
    chat_default_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class Params:
    """One request's sampling and output settings (shared by its prompts and its ``n`` choices)."""

    max_tokens: list[int]  # per prompt (a default budget is clipped to each prompt's room in the context)
    temperature: float
    top_p: float
    n: int
    seed: int
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    echo: bool = False


class Prompt(NamedTuple):
    ids: list[int]
    text: str


class _Fields:
    """Typed access to a request body's fields; errors name the field."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
        self.body = body

    def get(self, key: str) -> Any:
        return self.body.get(key)

    def number(self, key: str, default: Any, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None) -> Any:
        v = self.body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v):
            raise RequestError(400, f"field {key!r} must be a{'n integer' if integer else ' number'}, got {v!r}", key)
        v = int(v) if integer else float(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise RequestError(400, f"field {key!r} = {v} is outside [{lo}, {hi}]", key)
        return v

    def flag(self, key: str) -> bool:
        v = self.body.get(key)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise RequestError(400, f"field {key!r} must be true or false, got {v!r}", key)
        return v

    def refuse(self, unsupported: dict[str, tuple]) -> None:
        for key, allowed in unsupported.items():
            if key in self.body and not any(self.body[key] == a for a in allowed):
                raise RequestError(400, f"field {key!r} is not supported by this server", key)


def _common(f: _Fields, served: Served, prompt_lens: list[int], default_max: int, *, max_key: str,
            logprobs_key: str) -> Params:
    """The settings chat and completions share (temperature, top_p, n, seed, stop, stream, budget)."""
    temperature = f.number("temperature", 1.0, lo=0.0, hi=2.0)
    top_p = f.number("top_p", 1.0, lo=0.0, hi=1.0)
    if top_p <= 0.0:
        raise RequestError(400, "field 'top_p' must be > 0", "top_p")
    n = f.number("n", 1, integer=True, lo=1, hi=served.max_n)
    seed = f.number("seed", None, integer=True)
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    stop = f.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(400, f"field 'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                           "stop")
    stream = f.flag("stream")
    opts = f.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError(400, "field 'stream_options' must be an object", "stream_options")
    include_usage = bool(stream and opts and opts.get("include_usage"))

    limit = served.context_limit
    asked = f.number(max_key, None, integer=True, lo=1)
    budgets = []
    for i, plen in enumerate(prompt_lens):
        room = limit - plen
        budget = asked if asked is not None else min(default_max, room)
        if budget < 1 or plen + budget > limit:
            where = f" (prompt {i})" if len(prompt_lens) > 1 else ""
            raise RequestError(400, f"the prompt{where} has {plen} tokens; with {max_key}={budget} that exceeds the "
                                    f"model's context limit of {limit} tokens", max_key, "context_length_exceeded")
        budgets.append(budget)
    if logprobs_key == "logprobs":  # chat: logprobs is a flag, top_logprobs a count
        want = f.flag("logprobs")
        top = f.number("top_logprobs", 0, integer=True, lo=0, hi=TOP_LOGPROBS)
        if top and not want:
            raise RequestError(400, "field 'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:  # completions: logprobs is the count (null = none)
        top = f.number("logprobs", None, integer=True, lo=0, hi=TOP_LOGPROBS)
        want = top is not None
        top = top or 0
    return Params(budgets, temperature, top_p, n, seed, tuple(stop), want, top, stream, include_usage)


def _check_model(f: _Fields, served: Served) -> None:
    model = f.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"model {model!r} not found; this server serves {served.name!r}", "model",
                           "model_not_found")


def _message_text(content: Any, where: str) -> Any:
    """OpenAI's list-of-parts content ([{"type": "text", "text": ...}]) joined to one string."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}.content[{j}]: only text parts are supported", "messages")
        texts.append(part["text"])
    return "".join(texts)


def parse_chat(body: Any, served: Served) -> tuple[list[Prompt], Params]:
    """A /v1/chat/completions body -> (one prompt rendered with the chat template, its Params)."""
    f = _Fields(body)
    _check_model(f, served)
    f.refuse(_CHAT_UNSUPPORTED)
    fmt = f.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(400, "field 'response_format': only {'type': 'text'} is supported", "response_format")
    messages = f.get("messages")
    if isinstance(messages, list):
        messages = [dict(m, content=_message_text(m.get("content"), f"messages[{i}]")) if isinstance(m, dict) else m
                    for i, m in enumerate(messages)]
    try:
        messages = validate_messages(messages, source="messages")
        text = render_chat(served.tokenizer, messages, add_generation_prompt=True)
    except ChatError as e:
        raise RequestError(400, str(e), "messages") from None
    ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
    max_key = "max_completion_tokens" if f.get("max_completion_tokens") is not None else "max_tokens"
    params = _common(f, served, [len(ids)], served.chat_default_max_tokens, max_key=max_key, logprobs_key="logprobs")
    return [Prompt(ids, text)], params


def parse_completion(body: Any, served: Served) -> tuple[list[Prompt], Params]:
    """A /v1/completions body -> (its prompts: a string, strings, token ids or lists of them; Params)."""
    f = _Fields(body)
    _check_model(f, served)
    f.refuse(_COMPLETION_UNSUPPORTED)
    raw = f.get("prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "field 'prompt' must be a string, a list of strings, a list of token ids or a list "
                                "of such lists", "prompt")
    tok = served.tokenizer
    vocab = len(tok)
    prompts = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            prompts.append(Prompt(ids, p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < vocab for t in p):
                raise RequestError(400, f"prompt[{i}] has a token id outside the vocabulary (size {vocab})", "prompt")
            prompts.append(Prompt(list(p), tok.decode(p)))
        else:
            raise RequestError(400, f"prompt[{i}] must be a string or a list of token ids", "prompt")
        if not prompts[-1].ids:
            raise RequestError(400, f"prompt[{i}] is empty", "prompt")
    best_of = f.number("best_of", None, integer=True, lo=1)
    params = _common(f, served, [len(p.ids) for p in prompts], COMPLETION_DEFAULT_MAX_TOKENS, max_key="max_tokens",
                     logprobs_key="completion")
    if best_of is not None and best_of != params.n:
        raise RequestError(400, "field 'best_of' other than n is not supported", "best_of")
    echo = f.flag("echo")
    if echo and params.logprobs:
        raise RequestError(400, "'echo' together with 'logprobs' is not supported (no prompt logprobs)", "echo")
    if len(prompts) * params.n > served.max_n:
        raise RequestError(400, f"{len(prompts)} prompts x n={params.n} is more than {served.max_n} choices", "n")
    return prompts, replace(params, echo=echo)
