"""OpenAI request bodies -> what the engine runs: prompts as token ids and one :class:`Params`.

Every check happens here, before a request joins a batch, so a bad request is answered alone (an
:class:`RequestError` in OpenAI's error shape) and never disturbs the requests it would have shared a
``generate`` call with: the body is strict JSON (no NaN / Infinity), every string valid UTF-8 (no lone
surrogates), every number finite and in range, every count bounded, and every field is one this server
implements. A field it does not implement is refused by name (OpenAI answers unknown arguments the same
way), except at its neutral value (``tools: []``, ``logit_bias: {}``, ...). vLLM's sampling extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``) and
``chat_template_kwargs`` are implemented; the model's ``generation_config.json`` gives the defaults of the
sampling fields a request leaves out (as vLLM's ``--generation-config auto``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from emajax.chat import ChatError, validate_messages
from emajax.generate import MAX_STOP_IDS, TOP_LOGPROBS

MAX_N = 128
MAX_STOP = 16
MAX_MESSAGES = 4096
MAX_JSON_DEPTH = 64
CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields implemented (parsed below) per route; anything else is refused unless at a neutral value here.
_SAMPLING = {"model", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "max_tokens",
             "presence_penalty", "frequency_penalty", "user", "top_k", "min_p", "repetition_penalty", "min_tokens",
             "stop_token_ids", "ignore_eos"}
_CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                            "chat_template_kwargs"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs", "echo", "best_of"}
_NEUTRAL = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "parallel_tool_calls": (None,), "logit_bias": (None, {}),
            "audio": (None,), "prediction": (None,), "modalities": (None, ["text"]), "suffix": (None, ""),
            "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default")}
# Keys apply_chat_template takes itself: chat_template_kwargs may not set them.
_TEMPLATE_RESERVED = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                      "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class RequestError(ValueError):
    """A request answered with ``status`` and OpenAI's error body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """A request body as strict JSON: UTF-8, no NaN / Infinity, nesting at most ``MAX_JSON_DEPTH`` deep,
    every string encodable as UTF-8 (a lone surrogate escape such as ``\\ud800`` is refused)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    depth = run = 0
    for ch in text:  # bound nesting before parsing (the parser recurses)
        if ch in "[{":
            run += 1
            depth = max(depth, run)
        elif ch in "]}":
            run -= 1
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text or "null", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    _check_strings(body, "")
    return body


def _check_strings(v: Any, where: str) -> None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, f"field {where or 'body'!r} holds an invalid Unicode escape (a lone surrogate)",
                               where.split(".")[0].split("[")[0] or None) from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_strings(k, where)
            _check_strings(x, f"{where}.{k}" if where else k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_strings(x, f"{where}[{i}]")


def generation_defaults(model_dir: str | os.PathLike | None) -> dict[str, float]:
    """The sampling defaults of the model's ``generation_config.json`` (temperature, top_p, top_k, min_p,
    repetition_penalty; those present), {} without one."""
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    out = {k: cfg[k] for k in _GENERATION_CONFIG_KEYS if isinstance(cfg.get(k), (int, float))
           and not isinstance(cfg.get(k), bool) and math.isfinite(cfg[k])}
    if "top_k" in out:
        out["top_k"] = max(int(out["top_k"]), 0)
    return out


@dataclass(frozen=True)
class Served:
    """What request parsing needs to know about the served model."""

    name: str
    tokenizer: Any
    context_limit: int
    max_n: int = MAX_N
    chat_default_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS
    eos_ids: tuple[int, ...] = ()
    defaults: dict = field(default_factory=dict)  # generation_config.json's sampling defaults
    max_token_chars: int = 64  # the longest token's text: a prompt of more than context x this is too long

    @staticmethod
    def longest_token(tokenizer: Any) -> int:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return max((len(t) for t in vocab), default=64) or 64


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
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # the ids that end a row: EOS (unless ignore_eos) + stop_token_ids
    eos_ids: tuple[int, ...] = ()  # the model's EOS ids among them (never part of the text)


class Prompt(NamedTuple):
    ids: list[int]
    text: str


class _Fields:
    """Typed access to a request body's fields; errors name the field."""

    def __init__(self, body: Any, allowed: set[str]):
        if not isinstance(body, dict):
            raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
        self.body = body
        for key in body:
            if key in allowed:
                continue
            if key in _NEUTRAL:
                if not any(body[key] == a and type(body[key]) is type(a) for a in _NEUTRAL[key]):
                    raise RequestError(400, f"field {key!r} is not supported by this server", key)
            else:
                raise RequestError(400, f"unrecognized request argument supplied: {key!r} (this server does not "
                                        f"implement it)", key)

    def get(self, key: str) -> Any:
        return self.body.get(key)

    def number(self, key: str, default: Any, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None) -> Any:
        v = self.body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                integer and int(v) != v):
            raise RequestError(400, f"field {key!r} must be a{'n integer' if integer else ' finite number'}, got "
                                    f"{v!r}", key)
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

    def string(self, key: str) -> str | None:
        v = self.body.get(key)
        if v is not None and not isinstance(v, str):
            raise RequestError(400, f"field {key!r} must be a string", key)
        return v


def _n(f: _Fields, served: Served) -> int:
    return f.number("n", 1, integer=True, lo=1, hi=served.max_n)


def _common(f: _Fields, served: Served, prompt_lens: list[int], default_max: int, *, max_key: str,
            logprobs_key: str) -> Params:
    """The settings chat and completions share (sampling, n, seed, stop, stream, budget)."""
    d = served.defaults
    temperature = f.number("temperature", float(d.get("temperature", 1.0)), lo=0.0, hi=2.0)
    top_p = f.number("top_p", float(d.get("top_p", 1.0)), lo=0.0, hi=1.0)
    if top_p <= 0.0:
        raise RequestError(400, "field 'top_p' must be > 0", "top_p")
    top_k = f.number("top_k", int(d.get("top_k", 0)), integer=True, lo=-1)
    top_k = 0 if top_k == -1 or top_k >= len(served.tokenizer) else top_k  # vLLM: -1 (or 0) = off; >= vocab: all
    min_p = f.number("min_p", float(d.get("min_p", 0.0)), lo=0.0, hi=1.0)
    repetition = f.number("repetition_penalty", float(d.get("repetition_penalty", 1.0)), lo=0.0, hi=10.0)
    if repetition <= 0.0:
        raise RequestError(400, "field 'repetition_penalty' must be > 0", "repetition_penalty")
    presence = f.number("presence_penalty", 0.0, lo=-2.0, hi=2.0)
    frequency = f.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0)
    n = _n(f, served)
    seed = f.number("seed", None, integer=True)
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    stop = f.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(400, f"field 'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                           "stop")
    vocab = len(served.tokenizer)
    stop_ids = f.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else stop_ids
    ignore_eos = f.flag("ignore_eos")
    eos = () if ignore_eos else tuple(served.eos_ids)
    room = MAX_STOP_IDS - len(eos)
    if (not isinstance(stop_ids, list) or len(stop_ids) > room
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_ids)):
        raise RequestError(400, f"field 'stop_token_ids' must be a list of at most {room} token ids in "
                                f"[0, {vocab})", "stop_token_ids")
    stream = f.flag("stream")
    opts = f.get("stream_options")
    if opts is not None:
        if not stream:
            raise RequestError(400, "field 'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
                opts.get("include_usage", False), bool):
            raise RequestError(400, "field 'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    include_usage = bool(stream and opts and opts.get("include_usage"))
    min_tokens = f.number("min_tokens", 0, integer=True, lo=0)

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
        if min_tokens > budget:
            raise RequestError(400, f"field 'min_tokens' = {min_tokens} is more than {max_key} = {budget}",
                               "min_tokens")
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
    return Params(budgets, temperature, top_p, n, seed, tuple(stop), want, top, stream, include_usage,
                  top_k=top_k, min_p=min_p, repetition_penalty=repetition, presence_penalty=presence,
                  frequency_penalty=frequency, min_tokens=min_tokens,
                  stop_ids=tuple(dict.fromkeys((*eos, *stop_ids))), eos_ids=eos)


def _check_model(f: _Fields, served: Served) -> None:
    model = f.get("model")
    if model is not None and model != served.name:
        raise RequestError(404, f"model {model!r} not found; this server serves {served.name!r}", "model",
                           "model_not_found")


def _message_text(content: Any, where: str) -> Any:
    """OpenAI's list-of-parts content ([{"type": "text", "text": ...}]) joined with newlines (as vLLM joins them)."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str) or \
                set(part) - {"type", "text"}:
            raise RequestError(400, f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    f"supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def _too_long(served: Served, chars: int, where: str) -> None:
    """Refuse, before tokenizing, a text that cannot fit the context whatever its tokens."""
    if chars > served.context_limit * served.max_token_chars:
        raise RequestError(400, f"{where} has {chars} characters: more than the model's context of "
                                f"{served.context_limit} tokens can hold", where.split("[")[0],
                           "context_length_exceeded")


def _template_kwargs(f: _Fields) -> dict:
    kw = f.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise RequestError(400, "field 'chat_template_kwargs' must be an object", "chat_template_kwargs")
    bad = sorted(set(kw) & _TEMPLATE_RESERVED)
    if bad:
        raise RequestError(400, f"field 'chat_template_kwargs' may not set {', '.join(bad)}", "chat_template_kwargs")
    return kw


def parse_chat(body: Any, served: Served) -> tuple[list[Prompt], Params]:
    """A /v1/chat/completions body -> (one prompt rendered with the chat template, its Params)."""
    f = _Fields(body, _CHAT_FIELDS)
    _check_model(f, served)
    fmt = f.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(400, "field 'response_format': only {'type': 'text'} is supported", "response_format")
    f.string("user")
    _n(f, served)
    messages = f.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise RequestError(400, f"field 'messages' has {len(messages)} messages (limit {MAX_MESSAGES})", "messages")
        out = []
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                extra = set(m) - {"role", "content", "name"}
                if extra:
                    raise RequestError(400, f"messages[{i}]: field {sorted(extra)[0]!r} is not supported", "messages")
                if m.get("name") is not None and not isinstance(m.get("name"), str):
                    raise RequestError(400, f"messages[{i}].name must be a string", "messages")
                m = {"role": "system" if m.get("role") == "developer" else m.get("role"),
                     "content": _message_text(m.get("content"), f"messages[{i}]")}
            out.append(m)
        messages = out
    kwargs = _template_kwargs(f)
    try:
        messages = validate_messages(messages, source="messages")
    except ChatError as e:
        raise RequestError(400, str(e), "messages") from None
    _too_long(served, sum(len(m["content"]) for m in messages), "messages")
    tok = served.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise RequestError(400, "this model has no chat template: use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template raising on this conversation (e.g. role order) is the request's fault
        raise RequestError(400, f"the chat template refused these messages: {type(e).__name__}: {e}"[:500],
                           "messages") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    max_key = "max_completion_tokens" if f.get("max_completion_tokens") is not None else "max_tokens"
    params = _common(f, served, [len(ids)], served.chat_default_max_tokens, max_key=max_key, logprobs_key="logprobs")
    return [Prompt(ids, text)], params


def parse_completion(body: Any, served: Served) -> tuple[list[Prompt], Params]:
    """A /v1/completions body -> (its prompts: a string, strings, token ids or lists of them; Params).
    The number of choices (prompts x n) is checked before anything is tokenized."""
    f = _Fields(body, _COMPLETION_FIELDS)
    _check_model(f, served)
    f.string("user")
    n = _n(f, served)
    raw = f.get("prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(
            isinstance(t, int) and not isinstance(t, bool) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "field 'prompt' must be a string, a list of strings, a list of token ids or a list "
                                "of such lists", "prompt")
    if len(raw) * n > served.max_n:
        raise RequestError(400, f"{len(raw)} prompts x n={n} is more than {served.max_n} choices", "n")
    tok = served.tokenizer
    vocab = len(tok)
    prompts = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            _too_long(served, len(p), f"prompt[{i}]")
            prompts.append(Prompt(tok(p, add_special_tokens=False)["input_ids"], p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if len(p) > served.context_limit:
                raise RequestError(400, f"prompt[{i}] has {len(p)} tokens: more than the model's context of "
                                        f"{served.context_limit}", "prompt", "context_length_exceeded")
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
    return prompts, replace(params, echo=echo)
