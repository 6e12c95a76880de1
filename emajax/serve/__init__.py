"""OpenAI-compatible server on the emajax generation engine (``emajax serve``).

So a local model can be the judge or the model under test of any OpenAI-style client: chat and text
completions, streamed (server-sent events) or not, with logprobs, ``n``, ``stop``, ``seed`` and vLLM's
sampling extras. Concurrent requests are batched into shared ``generate`` calls with per-row settings.
Modules: ``protocol`` (request checks, error shape), ``batcher`` (the model thread), ``openai_format``
(response and chunk bodies), ``engine`` (ties them to one loaded model), ``app`` (the Starlette ASGI app:
routes, auth, Host check, admission control, SSE, disconnects), ``http`` (uvicorn, timeouts).
"""

from emajax.serve.app import Limits, make_app
from emajax.serve.engine import ChatEngine, load_model_with_adapter, warmup_shapes
from emajax.serve.http import Server, make_server, serve_in_thread
from emajax.serve.protocol import RequestError

__all__ = ["ChatEngine", "Limits", "RequestError", "Server", "load_model_with_adapter", "make_app", "make_server",
           "serve_in_thread", "warmup_shapes"]
