"""Fuzzing `emajax serve` with malformed request bodies (hypothesis): never a 500, never a lost neighbour.

10,000 bodies go through the ASGI app in-process (the real engine on a tiny random-weights model whose
context is 64 tokens, so the bodies that happen to be valid generate at most a few tokens in the same
two compiled shapes), while a neighbour thread keeps asking the same engine for a greedy answer and checks
each one; 200 more go to a live server over loopback. Bodies: random bytes, truncated or non-object JSON,
and valid requests with 1-3 fields set to hostile values (NaN / Infinity literals, 1e400, lone surrogate
escapes, huge or negative numbers, wrong types, deep nesting, unknown field names)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import urllib.parse

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from emajax.serve import ChatEngine, load_model_with_adapter, make_app, serve_in_thread  # noqa: E402
from tiny_chat import build_tiny_chat_dir  # noqa: E402

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hey there", "max_tokens": 2}
FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
          "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "echo", "best_of", "top_k", "min_p",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
          "chat_template_kwargs", "response_format", "tools", "logit_bias", "user", "suffix", "guided_json", "",
          "\ud800", "messages\x00"]
# Literal JSON texts of hostile values (what json.dumps cannot produce: NaN, Infinity, lone surrogates, 1e400).
LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0", "10000000000000000000000000000000",
            "-1", "0", "3.5", '"\\ud800"', '"\\udfff\\ud800"', '"x\\u0000y"', '""', '"NaN"', "true", "false", "null",
            "[]", "{}", "[null]", '[""]', "[1e400]", "[-1]", "[1, 2, 3]", '["\\ud800"]', '{"type": "text"}',
            '{"include_usage": "yes"}', '{"tokenize": true}', '[{"role": "user"}]',
            '[{"role": "user", "content": [{"type": "image_url"}]}]', '[{"role": "user", "content": "\\udbff"}]',
            '[{"role": "developer", "content": 5}]', '[{"role": "tool", "content": "x", "extra": 1}]',
            "[" * 200 + "]" * 200, '{"a": ' * 100 + "1" + "}" * 100, '"' + "a" * 5000 + '"']


def _render(obj: dict, overrides: dict[str, str]) -> bytes:
    """``obj`` as JSON with some fields replaced by literal JSON texts (hostile or not)."""
    parts = [json.dumps(k) + ": " + json.dumps(v) for k, v in obj.items() if k not in overrides]
    parts += [json.dumps(k) + ": " + lit for k, lit in overrides.items()]
    return ("{" + ", ".join(parts) + "}").encode("utf-8", "surrogatepass")


mutated = st.tuples(st.sampled_from(["chat", "completion"]),
                    st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(LITERALS), min_size=1, max_size=3)).map(
    lambda t: (t[0], _render(CHAT if t[0] == "chat" else COMPLETION, t[1])))
raw_bytes = st.tuples(st.sampled_from(["chat", "completion"]), st.binary(max_size=200))
truncated = st.tuples(st.sampled_from(["chat", "completion"]), st.integers(0, 60)).map(
    lambda t: (t[0], json.dumps(CHAT if t[0] == "chat" else COMPLETION).encode()[:t[1]]))
non_object = st.tuples(st.sampled_from(["chat", "completion"]), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10), lambda c: st.lists(c, max_size=3), max_leaves=8).map(
    lambda v: json.dumps(v).encode()))
BODIES = st.one_of(mutated, mutated, mutated, raw_bytes, truncated, non_object)
OK = {200, 400, 404, 413}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = build_tiny_chat_dir(tmp_path_factory.mktemp("tiny") / "model", rigged_head=False, max_pos=64)
    eng = ChatEngine(load_model_with_adapter(str(d)), "tiny", max_n=1, default_max_tokens=2, max_batch_rows=2,
                     batch_window_s=0.0, generation_config={})
    yield eng
    eng.close()


class Neighbour:
    """A thread asking the engine for one greedy answer over and over; every answer must be the first one."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.body = {"model": "tiny", "messages": [{"role": "user", "content": "neighbour"}], "max_tokens": 4,
                     "temperature": 0}
        self.want = engine.complete(self.body)["choices"][0]["message"]["content"]
        self.served, self.wrong = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.engine.complete(self.body)["choices"][0]["message"]["content"]
                if got != self.want:
                    self.wrong.append(got)
            except Exception as e:  # noqa: BLE001 - a lost neighbour is what this test looks for
                self.wrong.append(repr(e))
            self.served += 1

    def __enter__(self) -> "Neighbour":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


async def _call(app, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through the ASGI app in-process: (status, body). The client never disconnects."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent = [False]
    forever = asyncio.Event()

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()

    status, out = [0], []

    async def send(msg):
        if msg["type"] == "http.response.start":
            status[0] = msg["status"]
        elif msg["type"] == "http.response.body":
            out.append(msg.get("body", b""))

    await app(scope, receive, send)
    return status[0], b"".join(out)


def _check(status: int, data: bytes, body: bytes) -> None:
    assert status in OK, (status, body[:300], data[:300])
    if status != 200:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_ten_thousand_malformed_bodies_in_process(engine):
    app = make_app(engine)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    seen = {"n": 0, "ok": 0}

    @settings(max_examples=10_000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(BODIES)
    def fuzz(case):
        route, body = case
        status, data = asyncio.run_coroutine_threadsafe(_call(app, PATHS[route], body), loop).result(120)
        _check(status, data, body)
        seen["n"] += 1
        seen["ok"] += status == 200

    try:
        with Neighbour(engine) as nb:
            fuzz()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=30)
    assert seen["n"] >= 10_000
    assert 0 < seen["ok"] < seen["n"] // 2  # some hostile-looking bodies are valid and ran beside the neighbour
    assert nb.wrong == [] and nb.served >= 1
    assert engine.stats()["ready"]


def test_two_hundred_malformed_bodies_against_a_live_server(engine):
    server, url = serve_in_thread(engine)
    u = urllib.parse.urlsplit(url)
    conn = [http.client.HTTPConnection(u.hostname, u.port, timeout=120)]

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(BODIES)
    def fuzz(case):
        route, body = case
        try:
            conn[0].request("POST", PATHS[route], body=body, headers={"Content-Type": "application/json"})
            r = conn[0].getresponse()
            data = r.read()
        except (http.client.HTTPException, ConnectionError):  # the server closed this connection: open another
            conn[0].close()
            conn[0] = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            conn[0].request("POST", PATHS[route], body=body, headers={"Content-Type": "application/json"})
            r = conn[0].getresponse()
            data = r.read()
        if r.getheader("connection") == "close":
            conn[0].close()
            conn[0] = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        _check(r.status, data, body)

    try:
        with Neighbour(engine) as nb:
            fuzz()
        assert nb.wrong == [] and nb.served >= 1
    finally:
        conn[0].close()
        server.shutdown()
        server.server_close()
