"""`emajax serve` under load, as a process on loopback (bounded: 500 clients, 200 slow connections, seconds):
every client gets 200 or 429 (with Retry-After) and the server's memory stays bounded; idle and slowloris
connections neither delay a normal request by more than its own generation time nor outlive the header
timeout; a client that disconnects mid-request (streamed or not) frees its rows. No timed assertions
beyond generous relative ones (the machine is shared)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

import pytest

from tiny_chat import build_tiny_chat_dir

psutil = pytest.importorskip("psutil", reason="psutil measures the server's memory")

ROWS, QUEUE, HEADER_TIMEOUT = 4, 16, 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = build_tiny_chat_dir(tmp_path_factory.mktemp("tiny") / "model", rigged_head=False)
    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "serve", "--model", str(d),
           "--port", "0", "--served-model-name", "tiny", "--no-warmup", "--max-batch-rows", str(ROWS),
           "--max-concurrent-rows", str(ROWS), "--max-queue", str(QUEUE), "--header-timeout", str(HEADER_TIMEOUT),
           "--batch-window-ms", "5"]
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, line
    port = int(re.search(r":(\d+)/v1", line).group(1))
    try:
        _request(port, _body(4))  # the compiles
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _body(max_tokens: int, **kw) -> dict:
    return dict({"model": "tiny", "messages": [{"role": "user", "content": "hey I feel bored"}],
                 "max_tokens": max_tokens, "temperature": 0}, **kw)


def _request(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, json.loads(r.read())


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.split(" ", 1) for ln in lines if ln and not ln.startswith("#") and "{" not in ln)}


def _wait_for(pred, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def _raw_post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


async def _one_client(port: int, payload: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    data = await reader.read()  # Connection: close -> until EOF
    writer.close()
    return int(data.split(b" ", 2)[1]), data


def test_500_concurrent_clients_get_200_or_429_and_memory_stays_bounded(server):
    proc, port = server
    rss0 = psutil.Process(proc.pid).memory_info().rss

    async def wave():
        return await asyncio.gather(*[_one_client(port, _raw_post(_body(4))) for _ in range(500)])

    results = asyncio.run(wave())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= ROWS and statuses.count(429) >= 1
    assert all(b"retry-after: 1" in d.lower() for s, d in results if s == 429)
    rss1 = psutil.Process(proc.pid).memory_info().rss
    results = asyncio.run(wave())  # a second wave: memory does not keep growing
    rss2 = psutil.Process(proc.pid).memory_info().rss
    assert {s for s, _ in results} <= {200, 429}
    assert rss1 - rss0 < 256 << 20 and rss2 - rss1 < 64 << 20, (rss0, rss1, rss2)
    m = _metrics(port)
    assert m["emajax_admitted_rows"] == 0 and m["emajax_waiting_requests"] == 0 and m["emajax_rejected_requests"] >= 2
    assert _request(port, _body(4))[0] == 200  # still serving


def test_idle_and_slowloris_connections_do_not_delay_a_request(server):
    proc, port = server
    body = _body(48, ignore_eos=True)

    def timed() -> float:
        t = time.perf_counter()
        status, r = _request(port, body)
        assert status == 200 and r["usage"]["completion_tokens"] == 48
        return time.perf_counter() - t

    alone = statistics.median(timed() for _ in range(3))

    async def scenario():
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        for _, w in slow:
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def trickle():
            for _ in range(2 * HEADER_TIMEOUT + 4):
                for _, w in slow:
                    if not w.is_closing():
                        w.write(b"X")
                await asyncio.sleep(0.5)

        trickler = asyncio.ensure_future(trickle())
        loaded = []
        for _ in range(3):
            loaded.append(await asyncio.to_thread(timed))
        # Past the header timeout the server has closed every one of them (EOF on read).
        closed = await asyncio.wait_for(asyncio.gather(*[r.read() for r, _ in idle + slow]), 60)
        trickler.cancel()
        for _, w in idle + slow:
            w.close()
        return loaded, closed

    loaded, closed = asyncio.run(scenario())
    assert statistics.median(loaded) <= 2 * alone + 0.5, (loaded, alone)  # delayed by less than its own time
    assert all(c == b"" or c.startswith(b"HTTP/1.1 4") for c in closed)


def test_a_client_that_disconnects_frees_its_rows(server):
    proc, port = server
    before = _metrics(port)["emajax_generated_tokens"]
    long = _body(4000, ignore_eos=True)

    async def scenario(stream: bool):
        conns = []
        for _ in range(ROWS):  # every row this server admits
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(_raw_post(dict(long, stream=stream)))
            await w.drain()
            conns.append((r, w))
        await asyncio.to_thread(_wait_for, lambda: _metrics(port)["emajax_admitted_rows"] == ROWS, "admitted")
        if stream:
            for r, _ in conns:  # the stream has begun
                await r.readuntil(b"data: ")
        for _, w in conns:
            w.close()
        await asyncio.to_thread(_wait_for, lambda: _metrics(port)["emajax_admitted_rows"] == 0, "rows freed")

    for stream in (False, True):
        asyncio.run(scenario(stream))
        status, r = _request(port, _body(4))  # a new request gets the freed rows
        assert status == 200
    made = _metrics(port)["emajax_generated_tokens"] - before
    assert made < ROWS * 4000  # the cancelled rows stopped long before their budget
