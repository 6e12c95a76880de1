"""The ``emajax serve`` transport: uvicorn (h11) serving the Starlette app of ``emajax.serve.app``.

uvicorn runs every connection as a coroutine on one event loop (no thread per connection; listen
backlog 2048); the model runs on the batcher's thread. Timeouts: a connection must deliver its request
headers within ``header_timeout_s`` of opening (or of its previous response): a slowloris client that
trickles bytes is closed, an idle one too (uvicorn's keep-alive timeout closes idle keep-alive
connections sooner); the body must arrive within the app's ``body_timeout_s``. Headers are capped by h11
(16 KiB), connections by ``max_connections`` (uvicorn answers 503 past it: the last guard against file
descriptors running out; admission control answers 429 well before it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from emajax.serve.app import LOOPBACK_NAMES, Limits, make_app
from emajax.serve.engine import ChatEngine

log = logging.getLogger("emajax.serve")

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0
MAX_CONNECTIONS = 4096


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on request headers (uvicorn has none: a client that sends a
    partial request line holds its connection forever)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) only reaches this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """A bound ``emajax serve`` server: :meth:`serve_forever` in this thread, or :func:`serve_in_thread`.

    ``api_key`` None serves without authentication; ``allowed_hosts`` None: the loopback names (and any
    extra names) when bound to loopback, any Host otherwise."""

    def __init__(self, engine: ChatEngine, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 allowed_hosts: set[str] | None = None, limits: Limits = Limits(),
                 header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        hosts = None
        if is_loopback(host):
            hosts = frozenset(LOOPBACK_NAMES | {h.lower() for h in (allowed_hosts or ())})
        elif allowed_hosts:
            hosts = frozenset(h.lower() for h in allowed_hosts)
        self.engine = engine
        self.app = make_app(engine, api_key=api_key, allowed_hosts=hosts, limits=limits)
        protocol = type("TimedH11", (_TimedH11,), {"header_timeout_s": header_timeout_s})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections queue from here on, before serving starts (warm-up)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(self.app, http=protocol, lifespan="off", access_log=False, log_config=None,
                                timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections, backlog=2048,
                                timeout_graceful_shutdown=5, ws="none")
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        h, p = self.server_address
        return f"http://{'[' + h + ']' if ':' in h else h}:{p}/v1"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or SIGINT / SIGTERM when run in the main thread)."""
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Stop serving (in-flight responses get a few seconds) and wait for the serving thread."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine: ChatEngine, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Server:
    """A bound (not yet serving) server; port 0 picks a free port (see ``server.server_address``)."""
    return Server(engine, host, port, **kw)


def serve_in_thread(engine: ChatEngine, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[Server, str]:
    """Start serving in a daemon thread; returns (server, base URL 'http://host:port/v1'). Stop: server.shutdown()."""
    server = make_server(engine, host, port, **kw)
    server._thread = threading.Thread(target=server.serve_forever, name="emajax-serve", daemon=True)
    server._thread.start()
    while not server._uvicorn.started and server._thread.is_alive():
        time.sleep(0.01)
    return server, server.url
