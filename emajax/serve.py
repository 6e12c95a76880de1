"""OpenAI-compatible chat server on the emajax generation engine (stdlib http.server).

So a local model can be the judge or the model under test of any OpenAI-style client: serves
``POST /v1/chat/completions`` (messages, temperature, top_p, max_tokens, seed, n, stop, logprobs,
top_logprobs) and ``GET /v1/models``. Per-token logprobs come from one extra forward pass that scores the
generated tokens (the model's untempered distribution, as vLLM reports it). One lock serialises model
use; the server threads only parse and answer HTTP. Bind it to loopback unless you mean otherwise:
there is no authentication.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emajax.batching import bucket_length, pad_batch, pow2_bucket
from emajax.chat import ChatError, render_chat, validate_messages
from emajax.generate import GenerationError, default_eos_ids, generate

log = logging.getLogger("emajax.serve")

MAX_TOP_LOGPROBS = 20
MAX_N = 128
DEFAULT_MAX_TOKENS = 512


class RequestError(ValueError):
    """A bad request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def load_model_with_adapter(model: str, adapter: str | os.PathLike | None = None, *, dtype: str = "float32"):
    """``hub.load_model`` (+ a PEFT adapter dir whose LoRA shape is read from its adapter_config.json)."""
    from emajax.models.hf_io import load_peft_adapter, peft_lora_config
    from emajax.models.hub import load_model

    lora = peft_lora_config(adapter) if adapter is not None else None
    loaded = load_model(model, dtype=dtype, param_dtype=dtype, lora=lora)
    if adapter is not None:
        load_peft_adapter(loaded.model, adapter)
    return loaded


@functools.partial(jax.jit, static_argnames=("graphdef", "gen_bucket"))
def _score_core(graphdef, state, tokens_bt, mask_bt, start, *, gen_bucket: int):
    """Log-probs of tokens[:, start+1 : start+1+gen_bucket] and the top-20 alternatives at each of them."""
    model = nnx.merge(graphdef, state)
    hidden_btd = model(tokens_bt, attn_mask_bt=mask_bt, const_weights=True).hidden_btd
    h_bgd = jax.lax.dynamic_slice_in_dim(hidden_btd, start, gen_bucket, axis=1)
    logp_bgv = jax.nn.log_softmax(model.logits(h_bgd), axis=-1)
    nxt_bg = jax.lax.dynamic_slice_in_dim(tokens_bt, start + 1, gen_bucket, axis=1)
    tok_lp_bg = jnp.take_along_axis(logp_bgv, nxt_bg[..., None], axis=-1)[..., 0]
    top_lp_bgk, top_id_bgk = jax.lax.top_k(logp_bgv, MAX_TOP_LOGPROBS)
    return tok_lp_bg, top_lp_bgk, top_id_bgk


def score_generated(model, prompt_ids: list[int], gens: list[list[int]], pad_id: int):
    """Per generated token: (logprob [B][G], top logprobs [B][G][20], top ids [B][G][20]) via one forward pass."""
    g_max = max(1, max(len(g) for g in gens))
    gen_bucket = pow2_bucket(g_max)
    p = len(prompt_ids)
    # Room for the slice even when gens are short; long prompts (judge prompts) in steps of 256, not powers
    # of two: this pass is compute-bound on CPU and pow2 padding would waste up to half of it.
    t_bucket = pow2_bucket(p + gen_bucket, 32) if p + gen_bucket <= 256 else bucket_length(p + gen_bucket, 256)
    b_bucket = pow2_bucket(len(gens))
    rows = [prompt_ids + g for g in gens] + [prompt_ids] * (b_bucket - len(gens))
    tokens, mask, _ = pad_batch(rows, pad_id, t_bucket, side="right")
    graphdef, state = nnx.split(model)
    out = _score_core(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.int32(p - 1), gen_bucket=gen_bucket)
    return tuple(np.asarray(x) for x in out)


class ChatEngine:
    """Turns OpenAI chat requests into generate() calls on one loaded model (thread-safe via a lock)."""

    def __init__(self, loaded: Any, name: str, *, max_n: int = MAX_N, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.loaded = loaded
        self.name = name
        self.max_n = max_n
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()
        tok = loaded.tokenizer
        self.eos_ids = default_eos_ids(loaded.model, tok)
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "emajax"}]}

    def _token_str(self, tid: int) -> str:
        return self.loaded.tokenizer.decode([int(tid)], skip_special_tokens=False)

    def _entry(self, tid: int, lp: float) -> dict:
        s = self._token_str(tid)
        return {"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8"))}

    def complete(self, req: Any) -> dict:
        """The response body of one /v1/chat/completions request (raises RequestError on bad input)."""
        if not isinstance(req, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = req.get("model")
        if model is not None and model != self.name:
            raise RequestError(404, f"model {model!r} not found; this server serves {self.name!r}", "model")
        try:
            messages = validate_messages(req.get("messages"), source="messages")
        except ChatError as e:
            raise RequestError(400, str(e), "messages") from None

        def num(key, default, kind=float, lo=None, hi=None):
            v = req.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
                raise RequestError(400, f"field {key!r} must be a{'n integer' if kind is int else ' number'}", key)
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise RequestError(400, f"field {key!r} = {v} outside [{lo}, {hi}]", key)
            return v

        temperature = num("temperature", 1.0, float, 0.0, 2.0)
        top_p = num("top_p", 1.0, float, 1e-6, 1.0)
        max_tokens = num("max_completion_tokens", None, int, 1) or num("max_tokens", self.default_max_tokens, int, 1)
        n = num("n", 1, int, 1, self.max_n)
        seed = req.get("seed")
        seed = num("seed", 0, int) if seed is not None else int.from_bytes(os.urandom(4), "little")
        want_lp = bool(req.get("logprobs") or False)
        top_k = num("top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
        if top_k and not want_lp:
            raise RequestError(400, "field 'top_logprobs' needs 'logprobs': true", "top_logprobs")
        stop = req.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "field 'stop' must be a string or a list of non-empty strings", "stop")

        tok = self.loaded.tokenizer
        text = render_chat(tok, messages, add_generation_prompt=True)
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        limit = self.loaded.model.cfg.max_position_embeddings
        if len(prompt_ids) + max_tokens > limit:
            raise RequestError(400, f"prompt has {len(prompt_ids)} tokens; with max_tokens={max_tokens} that exceeds "
                                    f"the model's context limit {limit}", "max_tokens")
        with self._lock:
            if want_lp and temperature == 0.0 and max_tokens == 1:
                # The judge's request: the greedy token is the argmax of the scoring pass itself, so one
                # forward pass answers it (no separate generate() prefill).
                _, top_lp, top_id = score_generated(self.loaded.model, prompt_ids, [[]], self.pad_id)
                gens = [[int(top_id[0, 0, 0])] for _ in range(n)]
                rep = lambda a: np.repeat(a[:1], n, axis=0)  # noqa: E731
                scored = (rep(top_lp[:, :, 0]), rep(top_lp), rep(top_id))
            else:
                try:
                    gens = generate(self.loaded.model, tok, [prompt_ids] * n, max_new_tokens=max_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed, eos_ids=self.eos_ids)
                except GenerationError as e:
                    raise RequestError(400, str(e)) from None
                scored = score_generated(self.loaded.model, prompt_ids, gens, self.pad_id) if want_lp else None

        eos = set(self.eos_ids)
        choices = []
        for i, g in enumerate(gens):
            ended = bool(g) and g[-1] in eos
            content = tok.decode(g[:-1] if ended else g, skip_special_tokens=True)
            finish = "stop" if ended else "length"
            cut = min((content.find(s) for s in stop if s in content), default=-1)
            if cut >= 0:
                content, finish = content[:cut], "stop"
            lp = None
            if scored is not None:
                tok_lp, top_lp, top_id = scored
                lp = {"content": [dict(self._entry(t, tok_lp[i, j]),
                                       top_logprobs=[self._entry(top_id[i, j, k], top_lp[i, j, k]) for k in range(top_k)])
                                  for j, t in enumerate(g)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": content},
                            "finish_reason": finish, "logprobs": lp})
        n_out = sum(len(g) for g in gens)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                          "total_tokens": len(prompt_ids) + n_out}}


class _Handler(BaseHTTPRequestHandler):
    engine: ChatEngine  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # request line only; never headers
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send(200, self.engine.models())
        elif path in ("/health", ""):
            self._send(200, {"status": "ok", "model": self.engine.name})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {self.path}")
            return
        try:
            req = json.loads(raw.decode() or "null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._error(400, f"request body is not valid JSON: {e}")
            return
        try:
            self._send(200, self.engine.complete(req))
        except RequestError as e:
            self._error(e.status, str(e), e.param)
        except Exception as e:  # keep serving; report one line
            log.exception("chat completion failed")
            self._error(500, f"{type(e).__name__}: {e}")


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; port 0 picks a free port (see ``server.server_address``)."""
    handler = type("EmajaxHandler", (_Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(engine: ChatEngine, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; returns (server, base URL 'http://host:port/v1'). Stop: server.shutdown()."""
    server = make_server(engine, host, port)
    threading.Thread(target=server.serve_forever, name="emajax-serve", daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/v1"
