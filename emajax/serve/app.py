"""The HTTP API of ``emajax serve``: a Starlette (ASGI) app over a :class:`ChatEngine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` answers
``text/event-stream``: ``data: {chunk}`` events, then ``data: [DONE]``), ``GET /v1/models``, ``GET
/health`` (503 while warming up), ``GET /metrics`` (Prometheus text). Every error is OpenAI's JSON shape.

In front of the routes (:class:`Guard`, plain ASGI): the Host allow-list (DNS rebinding: a loopback
server answers only Host names that are loopback names), the API key (``Authorization: Bearer``,
compared in constant time; every route but ``/health``), and the access log (method, path without
query string, status; never headers or bodies). In each generation request, in order: ``application/json``
required (a plain-text POST from a web page is refused), the body read within ``body_timeout_s`` and
``max_body_bytes``, then checked and tokenized off the event loop, then admitted (:class:`Admission`), then
run. A client that disconnects at any point (waiting for admission, waiting for a non-streamed answer, or
mid-stream) cancels its request: its rows stop at the next decoding step and its admission is released.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from emajax.serve.engine import ChatEngine
from emajax.serve.protocol import RequestError, parse_json

log = logging.getLogger("emajax.serve")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Limits:
    """How much one server takes on. ``max_concurrent_rows``: rows (choices) admitted to the engine at once
    (running or queued for the next batch); ``max_queue``: requests waiting to be admitted (from arrival:
    reading, checking, then waiting for rows); past it a request gets 429 with ``Retry-After``."""

    max_concurrent_rows: int = 128  # = protocol.MAX_N: any valid request can be admitted
    max_queue: int = 128
    max_body_bytes: int = 32 << 20
    body_timeout_s: float = 30.0
    retry_after_s: int = 1


class Admission:
    """Admission control on the event loop: at most ``max_rows`` rows admitted, at most ``max_queue`` requests
    waiting (FIFO: a large request is not overtaken forever by small ones). Not thread-safe: loop only."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.rows = 0
        self.waiting = 0
        self._fifo: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self.rejected = 0

    def enter(self) -> None:
        """A request arrives: it waits in the queue until admitted; 429 when the queue is full."""
        if self.waiting >= self.limits.max_queue:
            self.rejected += 1
            raise RequestError(429, f"the server is busy ({self.waiting} requests waiting); retry later",
                               code="rate_limit_exceeded", headers={"Retry-After": str(self.limits.retry_after_s)})
        self.waiting += 1

    def leave(self) -> None:
        """A request that entered leaves the queue without being admitted (bad request, disconnect)."""
        self.waiting -= 1

    async def admit(self, n: int) -> None:
        """Wait until ``n`` more rows fit (the request leaves the queue when admitted)."""
        if n > self.limits.max_concurrent_rows:
            self.leave()
            raise RequestError(400, f"the request has {n} choices; this server runs at most "
                                    f"{self.limits.max_concurrent_rows} at once", "n")
        if not self._fifo and self.rows + n <= self.limits.max_concurrent_rows:
            self.rows += n
            self.waiting -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._fifo.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # admitted and cancelled at once: give the rows back
            else:
                self._fifo.remove(entry)
                self.waiting -= 1
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.rows -= n
        self._wake()

    def _wake(self) -> None:
        while self._fifo and self.rows + self._fifo[0][0] <= self.limits.max_concurrent_rows:
            n, fut = self._fifo.popleft()
            self.rows += n
            self.waiting -= 1
            fut.set_result(None)


def _error(err: RequestError, close: bool = False) -> JSONResponse:
    headers = dict(err.headers)
    if close:
        headers["Connection"] = "close"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def metrics_text(stats: dict) -> str:
    """The serving counters in Prometheus' text format."""
    lines = []
    for key, kind, what in (("generate_calls", "counter", "generate calls (batches) run"),
                            ("requests", "counter", "requests served by those calls"),
                            ("rows", "counter", "rows (choices) generated"),
                            ("generated_tokens", "counter", "tokens generated"),
                            ("max_requests_per_call", "gauge", "most requests one generate call held"),
                            ("queued", "gauge", "requests waiting for a batch"),
                            ("admitted_rows", "gauge", "rows admitted (running or queued for a batch)"),
                            ("waiting_requests", "gauge", "requests waiting to be admitted"),
                            ("rejected_requests", "counter", "requests answered 429 (queue full)")):
        lines += [f"# HELP emajax_{key} {what}", f"# TYPE emajax_{key} {kind}", f"emajax_{key} {int(stats[key])}"]
    lines += ["# HELP emajax_batches_by_requests generate calls by how many requests they held",
              "# TYPE emajax_batches_by_requests counter"]
    lines += [f'emajax_batches_by_requests{{requests="{k}"}} {v}' for k, v in stats["requests_per_call"].items()]
    return "\n".join(lines) + "\n"


def _host_name(host: str) -> str:
    """The name of a Host header value, without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: Host allow-list, bearer API key, access log. ``allowed_hosts`` None = any Host."""

    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope["headers"])  # the last of repeated headers; enough for Host / Authorization
        err = None
        host = headers.get(b"host")
        if self.allowed_hosts is not None and host is not None and \
                _host_name(host.decode("latin-1")) not in self.allowed_hosts:
            err = RequestError(400, "Host not allowed (this server answers only its own names)")
        elif self.key is not None and scope["path"].rstrip("/") != "/health":
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                err = RequestError(401, "Incorrect API key provided (send 'Authorization: Bearer KEY')",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        try:
            if err is not None:
                await _error(err)(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %s", client[0], scope["method"], scope["path"], status[0] or 499)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the request body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def make_app(engine: ChatEngine, *, api_key: str | None = None, allowed_hosts: frozenset[str] | None = None,
             limits: Limits = Limits()) -> Any:
    """The ASGI app serving ``engine`` (see the module doc)."""
    admission = Admission(limits)

    async def read_body(request: Request) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise RequestError(413, f"request body of {length} bytes (limit {limits.max_body_bytes})")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_body_bytes:
                        raise RequestError(413, f"request body over {limits.max_body_bytes} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, f"request body not received within {limits.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def generate(request: Request, route: str) -> Response:
        try:
            admission.enter()
        except RequestError as e:
            return _error(e, close=True)
        admitted = 0
        try:
            try:
                raw = await read_body(request)
            except RequestError as e:
                admission.leave()
                return _error(e, close=True)
            except Exception:  # the client went away while sending
                admission.leave()
                return Response(status_code=400, headers={"Connection": "close"})
            try:
                parsed = await run_in_threadpool(lambda: engine.parse(route, parse_json(raw)))
            except RequestError as e:
                admission.leave()
                return _error(e)
            except Exception as e:  # a check this server missed: its fault, one line to the client
                admission.leave()
                log.exception("request check failed")
                return _error(RequestError(500, f"internal error: {type(e).__name__}"))
            rows = len(parsed[0]) * parsed[1].n
            gone = asyncio.ensure_future(_wait_disconnect(request))
            admit = asyncio.ensure_future(admission.admit(rows))
            await asyncio.wait({gone, admit}, return_when=asyncio.FIRST_COMPLETED)
            if not admit.done():  # the client left while queued
                admit.cancel()
                await asyncio.gather(admit, return_exceptions=True)
                return Response(status_code=499)
            if admit.exception() is not None:
                gone.cancel()
                err = admit.exception()
                return _error(err) if isinstance(err, RequestError) else _error(RequestError(500, "internal error"))
            admitted = rows
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            try:
                job = engine.start(parsed, listener=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            except RequestError as e:
                gone.cancel()
                return _error(e)
            if parsed[1].stream:
                gone.cancel()
                await asyncio.gather(gone, return_exceptions=True)
                response = StreamingResponse(_sse(engine, route, job, events, admission, rows), media_type=
                                             "text/event-stream; charset=utf-8", headers={"Cache-Control": "no-cache"})
                admitted = 0  # the stream releases its rows when it ends
                return response
            finished = asyncio.ensure_future(_drain(events))
            await asyncio.wait({gone, finished}, return_when=asyncio.FIRST_COMPLETED)
            if not finished.done():  # the client went away: stop its rows at the next step
                job.cancel()
                finished.cancel()
                return Response(status_code=499)
            gone.cancel()
            try:
                return JSONResponse(engine.response(route, job))
            except RequestError as e:
                return _error(e)
        finally:
            if admitted:
                admission.release(admitted)

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completion(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        return JSONResponse(engine.models())

    def stats() -> dict:
        return dict(engine.stats(), admitted_rows=admission.rows, waiting_requests=admission.waiting,
                    rejected_requests=admission.rejected)

    async def health(request: Request) -> Response:
        ready = engine.stats()["ready"]
        return JSONResponse({"status": "ok" if ready else "warming up", "model": engine.name},
                            status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(metrics_text(stats()), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _error(RequestError(405, f"method {request.method} not allowed on {request.url.path}"))
        if exc.status_code == 404:
            return _error(RequestError(404, f"Invalid URL ({request.method} {request.url.path})"))
        return _error(RequestError(exc.status_code, str(exc.detail)))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return _error(RequestError(500, f"internal error: {type(exc).__name__}"))

    routes = [Route(p, chat, methods=["POST"]) for p in ("/v1/chat/completions", "/chat/completions")]
    routes += [Route(p, completion, methods=["POST"]) for p in ("/v1/completions", "/completions")]
    routes += [Route(p, models, methods=["GET"]) for p in ("/v1/models", "/models")]
    routes += [Route(p, health, methods=["GET"]) for p in ("/health", "/")]
    routes += [Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.admission = admission
    app.state.stats = stats
    return Guard(app, api_key=api_key, allowed_hosts=allowed_hosts)


async def _drain(events: asyncio.Queue) -> None:
    while await events.get() is not None:
        pass


async def _sse(engine: ChatEngine, route: str, job: Any, events: asyncio.Queue, admission: Admission,
               rows: int) -> AsyncIterator[bytes]:
    """The job's chunks as server-sent events, then ``[DONE]``; a failure becomes an ``error`` event. Cancelled
    (the client went away): the job is cancelled. Either way its rows are released."""
    def event(payload: Any) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    try:
        stream = engine.stream(route, job)
        for c in stream.opening():
            yield event(c)
        while True:
            ev = await events.get()
            if ev is None:
                break
            for c in stream.event(ev):
                yield event(c)
        if job.error is not None:
            yield event(job.error.body())
        else:
            for c in stream.closing():
                yield event(c)
    except Exception as e:  # noqa: BLE001 - the stream has begun (200): the failure is an event, then [DONE]
        log.exception("stream failed")
        yield event(RequestError(500, f"internal error: {type(e).__name__}").body())
    finally:
        if not job.done.is_set():
            job.cancel()
        admission.release(rows)
    yield b"data: [DONE]\n\n"
