"""`emajax serve` as a server facing traffic, driven by the official `openai` client and raw HTTP on loopback:
API key, Host allow-list, Content-Type, strict fields (unknown ones named), NaN / surrogates, the developer
role, vLLM's sampling extras, chat_template_kwargs, stream_options, generation_config.json defaults,
/health while warming up; and below HTTP: a row failing inside a batch fails alone, and detokenization
is incremental (linear, equal to a full decode)."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import numpy as np
import pytest

from emajax.serve import ChatEngine, load_model_with_adapter, serve_in_thread
from emajax.serve.batcher import Batcher, Job
from emajax.serve.protocol import Params, Prompt, RequestError, Served, parse_chat
from tiny_chat import build_tiny_chat_dir

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

KEY = "sk-test-key-0123456789"
USER = [{"role": "user", "content": "hey I feel bored"}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = build_tiny_chat_dir(tmp_path_factory.mktemp("tiny") / "model", rigged_head=False)
    return load_model_with_adapter(str(d))


@pytest.fixture(scope="module")
def served(loaded):
    engine = ChatEngine(loaded, "tiny", batch_window_s=0.0, generation_config={})
    server, url = serve_in_thread(engine, "127.0.0.1", 0, api_key=KEY)
    yield engine, url
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1], api_key=KEY, max_retries=0, timeout=120)


def _raw(url, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one raw HTTP request."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(data)
    except ValueError:
        return r.status, dict(r.getheaders()), data.decode(errors="replace")


def test_api_key_is_required_and_checked(served, client):
    url = served[1]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=USER, max_tokens=2)
    status, headers, body = _raw(url, "GET", "/v1/models", headers={"Authorization": None})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    assert _raw(url, "GET", "/metrics", headers={"Authorization": "Bearer " + KEY[:-1]})[0] == 401
    assert _raw(url, "GET", "/health", headers={"Authorization": None})[0] == 200  # health stays open
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_host_allow_list_and_content_type(served):
    url = served[1]
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 1})
    status, _, err = _raw(url, "POST", "/v1/chat/completions", body, {"Host": "evil.example:8000"})
    assert status == 400 and "Host" in err["error"]["message"]  # DNS rebinding: a foreign name is refused
    assert _raw(url, "POST", "/v1/chat/completions", body, {"Host": "localhost:1"})[0] == 200
    # A web page's "simple" cross-origin POST (text/plain) never reaches the model.
    status, _, err = _raw(url, "POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in err["error"]["message"]
    assert _raw(url, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json; charset=utf-8"})[0] \
        == 200


@pytest.mark.parametrize("extra,param", [({"logit_bias_typo": 1}, "logit_bias_typo"), ({"tools": [{"type": "x"}]},
                                         "tools"), ({"guided_json": {}}, "guided_json"),
                                         ({"best_of": 2}, "best_of"), ({"response_format": {"type": "json_object"}},
                                                                       "response_format")])
def test_unimplemented_fields_are_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=extra)
    assert e.value.param == param and repr(param) in e.value.message


def test_neutral_values_of_unimplemented_fields_pass(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0,
                                       extra_body={"tools": [], "logit_bias": {}, "user": "u1"})
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("field", ['"temperature": NaN', '"top_p": Infinity', '"n": 1e400', '"max_tokens": -Infinity',
                                   '"seed": NaN', '"messages": [{"role": "user", "content": "\\udc00"}]'])
def test_non_finite_numbers_and_lone_surrogates_are_400(served, field):
    """What the official client cannot even send (it refuses NaN): raw bodies, each answered alone with 400."""
    body = '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], ' + field + "}"
    status, _, err = _raw(served[1], "POST", "/v1/chat/completions", body.encode())
    assert status == 400 and err["error"]["type"] == "invalid_request_error", (field, err)


@pytest.mark.parametrize("kw,param", [
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(extra_body={"top_k": 1.5}), "top_k"), (dict(extra_body={"min_p": 2}), "min_p"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"stop_token_ids": [10 ** 9]}), "stop_token_ids"),
    (dict(extra_body={"min_tokens": 5}, max_tokens=2), "min_tokens"),
    (dict(extra_body={"chat_template_kwargs": {"tokenize": True}}), "chat_template_kwargs"),
])
def test_bad_values_are_400_and_never_reach_a_batch(client, served, kw, param):
    calls = served[0].stats()["generate_calls"]
    body = dict(dict(model="tiny", messages=USER, max_tokens=2), **kw)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    if param is not None:
        assert e.value.param == param
    assert served[0].stats()["generate_calls"] == calls


def test_developer_role_is_the_system_role(client, loaded):
    """The developer message is rendered as the system message (Qwen-style templates would otherwise put
    their default system prompt in front of it); text parts are joined with newlines."""
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    dev = client.chat.completions.create(messages=[{"role": "developer", "content": "Be terse."}] + USER, **kw)
    sys_ = client.chat.completions.create(messages=[{"role": "system", "content": "Be terse."}] + USER, **kw)
    assert dev.usage == sys_.usage and dev.choices[0].message.content == sys_.choices[0].message.content
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hey I"}, {"type": "text", "text": "feel bored"}]}], **kw)
    joined = client.chat.completions.create(messages=[{"role": "user", "content": "hey I\nfeel bored"}], **kw)
    assert parts.usage == joined.usage and parts.choices[0].message.content == joined.choices[0].message.content
    # chat_template_kwargs reach the template (a variable it ignores changes nothing)
    r = client.chat.completions.create(messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                                       **kw)
    assert r.usage.prompt_tokens == client.chat.completions.create(messages=USER, **kw).usage.prompt_tokens


def test_vllm_sampling_extras(client, loaded):
    kw = dict(model="tiny", messages=USER, max_tokens=8)
    greedy = client.chat.completions.create(temperature=0, **kw)
    # top_k = 1 and min_p = 1 keep only the top token: greedy whatever the temperature and seed
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(temperature=1.5, seed=3, extra_body=extra, **kw)
        assert r.choices[0].message.content == greedy.choices[0].message.content, extra
    # ignore_eos + min_tokens: the row runs to its budget
    r = client.chat.completions.create(temperature=1.0, seed=1, extra_body={"ignore_eos": True, "min_tokens": 8}, **kw)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    # stop_token_ids: the greedy answer's second token ends it, as a "stop"
    tok = loaded.tokenizer
    ids = tok(tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    from emajax.generate import generate
    (ref,) = generate(loaded.model, tok, [ids], max_new_tokens=8)
    r = client.chat.completions.create(temperature=0, extra_body={"stop_token_ids": [ref[1]]}, **kw)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ref.index(ref[1]) + 1
    # repetition_penalty reaches the sampler: a strong one changes the greedy answer, and is deterministic
    a = client.chat.completions.create(temperature=0, extra_body={"repetition_penalty": 5.0}, **kw)
    b = client.chat.completions.create(temperature=0, extra_body={"repetition_penalty": 5.0}, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != greedy.choices[0].message.content
    pres = client.chat.completions.create(temperature=0, presence_penalty=2.0, frequency_penalty=2.0, **kw)
    assert pres.choices[0].finish_reason in ("stop", "length")


def test_generation_config_defaults_apply_to_omitted_fields(loaded, tmp_path):
    """The model's generation_config.json gives the defaults (here greedy) of fields a request leaves out."""
    (loaded.model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 50}))
    try:
        engine = ChatEngine(loaded, "tiny", batch_window_s=0.0)
    finally:
        (loaded.model_dir / "generation_config.json").unlink()
    try:
        assert engine.served.defaults == {"temperature": 0.0, "top_k": 50}
        body = {"model": "tiny", "messages": USER, "max_tokens": 6}
        a, b = engine.complete(dict(body, seed=1)), engine.complete(dict(body, seed=2))
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]  # greedy by default
        _, params = engine.parse("chat", dict(body, temperature=1.0))
        assert params.temperature == 1.0 and params.top_k == 50  # a field the request sets wins
    finally:
        engine.close()


def test_health_is_503_while_warming_up(loaded):
    engine = ChatEngine(loaded, "tiny", warmup=[(1, 64, 16), (2, 64, 16)])
    server, url = serve_in_thread(engine)
    try:
        status, _, body = _raw(url, "GET", "/health")
        assert (status, body["status"]) == (503, "warming up")  # a new generator compiles its programs first
        assert engine.wait_ready(300)
        assert _raw(url, "GET", "/health")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        engine.close()


def test_a_row_failing_inside_a_batch_fails_alone(loaded):
    """One job whose rows fail the generator's checks, one whose text handling raises: both fail alone,
    their neighbours in the same batch finish with the answers they get alone."""
    engine = ChatEngine(loaded, "tiny", batch_window_s=0.0)
    engine.close()  # use the parts directly: one batcher, one batch
    served = engine.served
    tok = loaded.tokenizer
    good = [parse_chat({"messages": [{"role": "user", "content": f"hey {i}"}], "max_tokens": 6, "temperature": 0},
                       served) for i in range(2)]
    prompts, params = good[0]
    bad_params = Params(**{**params.__dict__, "temperature": float("nan")})

    class Exploding:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, *a, **k):
            raise RuntimeError("boom")

    batcher = Batcher(engine.generator, max_batch_rows=8, window_s=0.0)
    try:
        jobs = [Job(*good[0], tokenizer=tok), Job(prompts, bad_params, tokenizer=tok),
                Job(*good[1], tokenizer=tok), Job(*good[1], tokenizer=Exploding())]
        batcher._run(list(jobs))  # one batch, as _take would gather it
        assert [j.done.is_set() for j in jobs] == [True] * 4
        assert jobs[0].error is None and jobs[2].error is None
        assert jobs[1].error.status == 400 and "temperature" in str(jobs[1].error)
        assert jobs[3].error.status == 500
        for job, parsed in ((jobs[0], good[0]), (jobs[2], good[1])):
            alone = Job(*parsed, tokenizer=tok)
            batcher._run([alone])
            assert job.choices[0].text == alone.choices[0].text and job.choices[0].tokens == alone.choices[0].tokens
    finally:
        batcher.close()


def test_incremental_detokenization_is_linear_and_exact(loaded):
    """Streaming text decodes a bounded window per token (not the whole output each step) and adds up
    to the full decode, multi-byte characters included."""
    tok = loaded.tokenizer
    text = "héllo wörld ✓ 日本語 " * 40
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = [0]

    class Counting:
        def decode(self, t, **k):
            decoded[0] += len(t)
            return tok.decode(t, **k)

    params = Params([len(ids)], 0.0, 1.0, 1, 0, (), False, 0, True, False)
    job = Job([Prompt([1], "x")], params, tokenizer=Counting())
    for t in ids:
        job.advance(job.choices[0], t, None)
    deltas = [ev.text for ev in job.iter_events()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == job.choices[0].text
    assert decoded[0] < 12 * len(ids)  # a full re-decode per step would be ~len(ids)**2 / 2
    assert len(ids) > 300


def test_completions_counts_prompts_before_tokenizing(loaded):
    calls = [0]
    tok = loaded.tokenizer

    class Counting:
        def __len__(self):
            return len(tok)

        def __call__(self, *a, **k):
            calls[0] += 1
            return tok(*a, **k)

    served = Served("tiny", Counting(), 4096, max_n=4)
    from emajax.serve.protocol import parse_completion
    with pytest.raises(RequestError, match="more than 4 choices"):
        parse_completion({"prompt": ["a"] * 3, "n": 2}, served)
    with pytest.raises(RequestError, match="more than 4 choices"):
        parse_completion({"prompt": ["a"] * 5000}, served)
    assert calls[0] == 0
    assert np.isfinite(len(parse_completion({"prompt": ["a", "b"], "n": 2}, served)[0]))


def test_admission_is_fifo_bounded_and_gives_rows_back():
    """At most max_concurrent_rows admitted, max_queue waiting (then 429 + Retry-After), FIFO, and a waiter
    that is cancelled (its client left) neither keeps its place nor leaks rows."""
    import asyncio

    from emajax.serve.app import Admission, Limits

    async def scenario():
        adm = Admission(Limits(max_concurrent_rows=4, max_queue=2))
        adm.enter()
        await adm.admit(3)  # admitted at once
        order = []

        async def wait(n, tag):
            adm.enter()
            await adm.admit(n)
            order.append(tag)

        big = asyncio.ensure_future(wait(4, "big"))
        small = asyncio.ensure_future(wait(1, "small"))  # fits now, but waits behind big (FIFO)
        await asyncio.sleep(0)
        assert (adm.rows, adm.waiting, order) == (3, 2, [])
        with pytest.raises(RequestError) as e:
            adm.enter()
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"} and adm.rejected == 1
        big.cancel()  # its client went away
        await asyncio.gather(big, return_exceptions=True)
        await asyncio.sleep(0)
        assert order == ["small"] and (adm.rows, adm.waiting) == (4, 0)
        adm.release(3)
        adm.release(1)
        assert adm.rows == 0
        adm.enter()
        with pytest.raises(RequestError) as e:
            await adm.admit(5)  # can never fit
        assert e.value.status == 400 and adm.waiting == 0

    asyncio.run(scenario())


def test_a_non_loopback_bind_needs_a_key_or_insecure():
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "serve", "--model",
           "no-such-model-dir", "--host", "0.0.0.0", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "EMAJAX_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "--api-key" in r.stderr and "--insecure" in r.stderr, r.stderr[-1000:]
    # With --insecure (or a key) the bind check passes and it goes on to load the model (which does not exist).
    r = subprocess.run(cmd + ["--insecure"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "--insecure" not in r.stderr and "no-such-model-dir" in r.stderr, r.stderr[-1000:]
