"""HTTP for the engine (stdlib ``ThreadingHTTPServer``): routes, JSON bodies, server-sent events.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` answers
``text/event-stream``: ``data: {chunk}`` events, then ``data: [DONE]``, over chunked transfer
encoding), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (batching counters, Prometheus text).
Every error is OpenAI's JSON shape with its status; a failure inside a stream becomes an
``data: {"error": ...}`` event. The log gets method, path and status only, never query strings, headers
or bodies (an ``Authorization`` header is accepted and ignored: there is no authentication).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from emajax.serve.engine import ChatEngine
from emajax.serve.protocol import RequestError

log = logging.getLogger("emajax.serve")

MAX_BODY_BYTES = 32 << 20
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/completions")


def metrics_text(stats: dict) -> str:
    """The batching counters in Prometheus' text format."""
    lines = []
    for key, kind, what in (("generate_calls", "counter", "generate calls (batches) run"),
                            ("requests", "counter", "requests served by those calls"),
                            ("rows", "counter", "rows (choices) generated"),
                            ("generated_tokens", "counter", "tokens generated"),
                            ("max_requests_per_call", "gauge", "most requests one generate call held"),
                            ("queued", "gauge", "requests waiting for a batch")):
        lines += [f"# HELP emajax_{key} {what}", f"# TYPE emajax_{key} {kind}", f"emajax_{key} {int(stats[key])}"]
    lines += ["# HELP emajax_batches_by_requests generate calls by how many requests they held",
              "# TYPE emajax_batches_by_requests counter"]
    lines += [f'emajax_batches_by_requests{{requests="{k}"}} {v}' for k, v in stats["requests_per_call"].items()]
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    engine: ChatEngine  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"
    server_version = "emajax"

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Method, path (no query string: it could carry a key) and status; never headers or bodies."""
        log.info("%s %s %s %s", self.address_string(), self.command, self.path.split("?")[0], code)

    def log_message(self, fmt: str, *args: Any) -> None:  # http.server's own errors (bad request lines)
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _error(self, err: RequestError) -> None:
        self._json(err.status, err.body())

    def _path(self) -> str:
        return self.path.split("?")[0].rstrip("/")

    def do_GET(self) -> None:  # noqa: N802
        path = self._path()
        if path in ("/v1/models", "/models"):
            self._json(200, self.engine.models())
        elif path in ("/health", ""):
            ready = self.engine.stats()["ready"]
            self._json(200, {"status": "ok" if ready else "warming up", "model": self.engine.name})
        elif path == "/metrics":
            self._send(200, metrics_text(self.engine.stats()).encode(), "text/plain; version=0.0.4")
        elif path in CHAT_PATHS + COMPLETION_PATHS:
            self._error(RequestError(405, f"use POST for {path}"))
        else:
            self._error(RequestError(404, f"Invalid URL (GET {self.path})"))

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length")
        try:
            n = int(length or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(413 if n > 0 else 400, f"request body of {n} bytes (limit {MAX_BODY_BYTES})")
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw.decode() or "null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}") from None

    def do_POST(self) -> None:  # noqa: N802
        path = self._path()
        try:
            req = self._read_json()
            if path in CHAT_PATHS:
                stream, complete = self.engine.stream_chat, self.engine.complete
            elif path in COMPLETION_PATHS:
                stream, complete = self.engine.stream_text, self.engine.complete_text
            else:
                raise RequestError(404, f"Invalid URL (POST {self.path})")
            if isinstance(req, dict) and req.get("stream") is True:
                self._sse(stream(req))
            else:
                self._json(200, complete(req))
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # keep serving; the log has the traceback, the client one line
            log.exception("request failed")
            self._error(RequestError(500, f"internal error: {type(e).__name__}"))

    def do_PUT(self) -> None:  # noqa: N802
        self._error(RequestError(405, f"method PUT not allowed on {self._path() or '/'}"))

    do_DELETE = do_PATCH = do_PUT

    def _event(self, payload: bytes) -> None:
        data = b"data: " + payload + b"\n\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _sse(self, chunks: Iterator[dict]) -> None:
        """Stream ``chunks`` as server-sent events (chunked transfer encoding), then ``[DONE]``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            try:
                for c in chunks:
                    self._event(json.dumps(c).encode())
            except RequestError as e:
                self._event(json.dumps(e.body()).encode())
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:
                log.exception("stream failed")
                self._event(json.dumps(RequestError(500, f"internal error: {type(e).__name__}").body()).encode())
            self._event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator abandoned mid-stream cancels its request


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
