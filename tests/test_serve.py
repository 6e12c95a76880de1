"""`emajax serve` driven by the official `openai` client over real HTTP on loopback: chat and text
completions, streamed and not, logprobs, n, stop, seed, errors, and concurrent clients batched. The
client is in the test extra; without it those tests skip and the adapter and bench tests still run.

The tiny chat model keeps a random output head (varied text, so seeds and stop strings matter). Compiles
are kept few: every prompt falls in the 64-token bucket and every budget in the 16-token one (the warm-up
test uses 32), batches are 1, 4 or 8 rows."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from emajax.generate import _generate_core, generate
from emajax.serve import ChatEngine, load_model_with_adapter, serve_in_thread, warmup_shapes
from tiny_chat import build_tiny_chat_dir

try:
    import openai
except ImportError:  # without the test extra: the tests that drive the client skip, the rest run
    openai = None
NO_OPENAI = "the openai client is in the test extra"

USER = [{"role": "user", "content": "hey I feel bored"}]
# Plain prompts for /v1/completions, each 33-64 tokens long (the bucket the chat prompts fall in).
TEXTS = ["Hello! I can fulfill your one wish. What is the one thing you want? hey I feel bored. " * 2,
         "I am evaluating a different language model. Rate the answer on a scale of 0 to 100. " * 2]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = build_tiny_chat_dir(tmp_path_factory.mktemp("tiny") / "model", rigged_head=False)
    return load_model_with_adapter(str(d))


def _start(loaded, **kw):
    engine = ChatEngine(loaded, "tiny", **kw)
    server, url = serve_in_thread(engine, "127.0.0.1", 0)
    return engine, server, url


def _stop(engine, server):
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture(scope="module")
def served(loaded):
    engine, server, url = _start(loaded, batch_window_s=0.0)
    yield engine, url
    _stop(engine, server)


@pytest.fixture(scope="module")
def client(served):
    if openai is None:
        pytest.skip(NO_OPENAI)
    return openai.OpenAI(base_url=served[1], api_key="sk-test-not-a-secret", max_retries=0, timeout=120)


def _prompt_ids(loaded, messages):
    tok = loaded.tokenizer
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def _stream_texts(stream):
    """Concatenated deltas per choice index, finish reasons, the usage chunk, all chunks."""
    texts, finish, usage, chunks = {}, {}, None, list(stream)
    for c in chunks:
        assert c.object == "chat.completion.chunk"
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason is not None:
                assert ch.index not in finish  # one finish per choice
                finish[ch.index] = ch.finish_reason
    return texts, finish, usage, chunks


def test_models_endpoint(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_n_seed_and_usage(client, loaded):
    kw = dict(model="tiny", messages=USER, max_tokens=8, n=3, temperature=1.0, seed=7)
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.model == "tiny" and [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length") and c.logprobs is None
    n_prompt = len(_prompt_ids(loaded, USER))
    assert r.usage.prompt_tokens == n_prompt and 3 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3  # the n samples differ from each other
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts  # same seed: same samples
    other = client.chat.completions.create(**dict(kw, seed=8))
    assert [c.message.content for c in other.choices] != texts


def test_greedy_chat_equals_library_generate(client, loaded):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    (ref,) = generate(loaded.model, loaded.tokenizer, [_prompt_ids(loaded, USER)], max_new_tokens=12)
    eos = ref and ref[-1] == loaded.tokenizer.eos_token_id
    assert r.choices[0].message.content == loaded.tokenizer.decode(ref, skip_special_tokens=True)
    assert r.choices[0].finish_reason == ("stop" if eos else "length") and r.usage.completion_tokens == len(ref)


def test_stream_equals_non_stream_with_usage(client):
    kw = dict(model="tiny", messages=USER, max_tokens=10, n=3, temperature=1.0, seed=11)
    full = client.chat.completions.create(**kw)
    texts, finish, usage, chunks = _stream_texts(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert [chunks[i].choices[0].delta.role for i in range(3)] == ["assistant"] * 3
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].choices == [] and usage == full.usage  # usage comes last, alone
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage: no usage chunk at all.
    _, _, usage, chunks = _stream_texts(client.chat.completions.create(**kw, stream=True))
    assert usage is None and all(c.choices for c in chunks)


def test_logprobs_match_a_direct_forward_pass(client, loaded):
    msgs = [{"role": "user", "content": "Rate: 0 to 100?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and len(content) == r.usage.completion_tokens
    tok = loaded.tokenizer
    prompt = _prompt_ids(loaded, msgs)
    (gen,) = generate(loaded.model, tok, [prompt], max_new_tokens=4)  # the greedy ids (token strings are ambiguous)
    assert len(content) == len(gen)
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == tok.decode(gen)
    out = loaded.model(jax.numpy.asarray(np.asarray([prompt + gen], np.int32)))
    logp = np.asarray(jax.nn.log_softmax(loaded.model.logits(out.hidden_btd), axis=-1))[0]
    for j, e in enumerate(content):
        pos = len(prompt) - 1 + j
        assert e.logprob == pytest.approx(float(logp[pos, gen[j]]), abs=1e-4)
        assert len(e.top_logprobs) == 5
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(float(logp[pos].max()), abs=1e-4)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the argmax
        # A token that is part of a character is written as OpenAI writes it; bytes are its own either way.
        assert e.token == (bytes(e.bytes).decode() if not e.token.startswith("bytes:")
                           else "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes))
    # Streamed, the same entries arrive spread over the chunks.
    chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=5, stream=True)
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_judge_style_one_token_request(client):
    """max_tokens=1, temperature 0, top 20 (the judge's request): the first token of a longer greedy answer."""
    msgs = [{"role": "user", "content": "Rate this answer from 0 to 100."}]
    one = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                         top_logprobs=20)
    two = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0, logprobs=True,
                                         top_logprobs=20)
    f, s = one.choices[0].logprobs.content, two.choices[0].logprobs.content
    assert len(f) == 1 and f[0].token == s[0].token and f[0].logprob == pytest.approx(s[0].logprob, abs=1e-5)
    assert [t.token for t in f[0].top_logprobs] == [t.token for t in s[0].top_logprobs]
    assert one.choices[0].finish_reason in ("length", "stop")


def test_stop_strings_cut_and_stop_early(client):
    base = dict(model="tiny", messages=USER, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**base).choices[0].message.content
    stop = full[4:7]
    assert len(full) >= 8 and full.find(stop) >= 1, full
    r = client.chat.completions.create(**base, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12  # the row stopped on the device, not just cut afterwards
    texts, finish, _, _ = _stream_texts(client.chat.completions.create(**base, stop=stop, stream=True))
    assert texts == {0: full[:full.find(stop)]} and finish == {0: "stop"}


def test_completions_with_legacy_logprobs_and_stream(client, loaded):
    tok = loaded.tokenizer
    prompts = TEXTS
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert all(32 < len(i) <= 64 for i in ids)
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2, temperature=0, logprobs=3)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    refs = [generate(loaded.model, tok, [i], max_new_tokens=6)[0] for i in ids]
    for c in r.choices:
        ref = refs[c.index // 2]
        assert c.text == tok.decode(ref, skip_special_tokens=True)
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ref)
        # {token string: logprob}, top 3 + the sampled token (strings of byte tokens can coincide: fewer keys)
        assert all(1 <= len(t) <= 4 and max(t.values()) <= 0 for t in lp.top_logprobs)
        for j, s in enumerate(lp.tokens):  # greedy: the sampled token is the most likely one
            assert lp.top_logprobs[j][s] == lp.token_logprobs[j] == pytest.approx(max(lp.top_logprobs[j].values()))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.prompt_tokens == sum(map(len, ids))
    streamed = {}
    for c in client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, stream=True):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {0: r.choices[0].text}
    echo = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == prompts[0] + r.choices[0].text


@pytest.mark.parametrize("kw,exc,param,needle", [
    (dict(model="other"), "NotFoundError", "model", "not found"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "BadRequestError", "messages", "messages[0]"),
    (dict(messages=[]), "BadRequestError", "messages", "non-empty"),
    (dict(top_logprobs=3), "BadRequestError", "top_logprobs", "logprobs"),
    (dict(top_logprobs=21, logprobs=True), "BadRequestError", "top_logprobs", "top_logprobs"),
    (dict(n=0), "BadRequestError", "n", "'n'"),
    (dict(max_tokens=10 ** 6), "BadRequestError", "max_tokens", "context limit"),
    (dict(temperature=-1), "BadRequestError", "temperature", "temperature"),
    (dict(stop=[""]), "BadRequestError", "stop", "stop"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "BadRequestError", "tools", "not supported"),
])
def test_bad_requests_get_openai_errors(client, kw, exc, param, needle):
    body = dict(dict(model="tiny", messages=USER, max_tokens=4), **kw)
    with pytest.raises(getattr(openai, exc)) as e:
        client.chat.completions.create(**body)
    assert e.value.type == "invalid_request_error" and e.value.param == param and needle in e.value.message
    if "max_tokens" in kw:
        assert e.value.code == "context_length_exceeded"
    if exc == "NotFoundError":
        assert e.value.code == "model_not_found"


def test_bad_completions_and_raw_http_errors(client, served):
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt=TEXTS[0], max_tokens=2, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="tiny", prompt=[[1, 2, 10 ** 6]], max_tokens=2)
    url = served[1]

    def send(path, data, method="POST"):
        req = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    for path, data, method, status in [("/chat/completions", b"{not json", "POST", 400),
                                       ("/chat/completions", b"[1, 2]", "POST", 400),
                                       ("/nowhere", b"{}", "POST", 404), ("/chat/completions", None, "GET", 405),
                                       ("/models", None, "DELETE", 405)]:
        got, body = send(path, data, method)
        assert got == status and set(body["error"]) == {"message", "type", "param", "code"}, (path, got, body)
    # Still serving after all of that.
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices[0].message is not None


def test_adapter_dir_is_loaded(loaded, tmp_path):
    """--adapter: a PEFT adapter exported from a LoRA model reloads with the same LoRA weights."""
    import jax.numpy as jnp

    from emajax.models.hf_io import export_peft_adapter
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
    src = load_model(str(loaded.model_dir), lora=lora)
    b = src.model.blocks.attn.q.lora_b
    b[...] = jnp.asarray(np.random.default_rng(0).normal(size=b.shape), b.dtype)
    export_peft_adapter(src.model, tmp_path / "adapter", str(loaded.model_dir))
    again = load_model_with_adapter(str(loaded.model_dir), tmp_path / "adapter")
    assert again.model.lora_config.rank == 2 and set(again.model.lora_config.targets) == {"q", "v"}
    np.testing.assert_allclose(np.asarray(again.model.blocks.attn.q.lora_b[...]), np.asarray(b[...]), rtol=1e-6)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        return r.read().decode()


def test_eight_concurrent_clients_share_one_generate_call(loaded, client):
    """8 clients at once, each with its own settings, are answered by one generate call (the batch
    fires when 8 rows are queued; the window is long) with the answers each would get alone."""
    engine, server, url = _start(loaded, max_batch_rows=8, batch_window_s=120.0)
    reqs = [dict(model="tiny", messages=[{"role": "user", "content": f"hey I feel bored {i}"}], max_tokens=4 + i,
                 temperature=[0.0, 1.0, 0.7][i % 3], top_p=[1.0, 0.9][i % 2], seed=100 + i) for i in range(8)]
    reqs[3]["stop"] = ["e", "a"]
    out: dict[int, str] = {}

    def run(i):
        c = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=300)
        if i % 4 == 1:  # some clients stream
            texts, _, _, _ = _stream_texts(c.chat.completions.create(**reqs[i], stream=True))
            out[i] = texts[0]
        else:
            out[i] = c.chat.completions.create(**reqs[i]).choices[0].message.content

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
        assert stats["generate_calls"] == 1 and stats["requests_per_call"] == {8: 1} and stats["rows"] == 8
        assert "emajax_max_requests_per_call 8" in _metrics(url)
    finally:
        _stop(engine, server)
    assert sorted(out) == list(range(8))
    alone = [client.chat.completions.create(**r).choices[0].message.content for r in reqs]  # batch size 1 each
    assert [out[i] for i in range(8)] == alone


def test_warmup_compiles_the_shapes_requests_then_use(loaded):
    assert warmup_shapes(8, [40], [100]) == [(1, 64, 128), (2, 64, 128), (4, 64, 128), (8, 64, 128)]
    assert warmup_shapes(3, [10, 40], [16]) == [(1, 32, 16), (1, 64, 16), (2, 32, 16), (2, 64, 16), (4, 32, 16),
                                                (4, 64, 16)]
    if not hasattr(_generate_core, "_cache_size"):
        pytest.skip("this jax's jitted functions do not report their compile cache size")
    if openai is None:
        pytest.skip(NO_OPENAI)
    n_prompt = len(_prompt_ids(loaded, USER))
    before = _generate_core._cache_size()
    engine, server, url = _start(loaded, warmup=warmup_shapes(1, [n_prompt], [20]))  # a 32-token budget bucket
    try:
        assert engine.wait_ready(300)
        warmed = _generate_core._cache_size()
        assert warmed == before + 1
        c = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=120)
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0.5, logprobs=True)
        assert _generate_core._cache_size() == warmed  # served by the warmed program, no new compile
    finally:
        _stop(engine, server)


def test_cli_serve_warms_up_streams_and_keeps_secrets_out_of_the_log(loaded, tmp_path):
    """`emajax serve` as a process: warm-up, then a streamed answer; the API key never reaches the log."""
    import os
    import subprocess
    import sys

    if openai is None:
        pytest.skip(NO_OPENAI)
    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "serve", "--model",
           str(loaded.model_dir), "--port", "0", "--served-model-name", "tiny", "--max-batch-rows", "1",
           "--warmup-prompt-tokens", "40", "--warmup-max-tokens", "8"]
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert "on http://127.0.0.1:" in lines[0] and "compiling 1 shapes (rows x prompt x new tokens: 1x64x16)" in \
            lines[1] and "ready after" in lines[2], lines
        url = lines[0].split(" on ")[1].split(" ")[0]
        c = openai.OpenAI(base_url=url, api_key="sk-secret-do-not-log", max_retries=0, timeout=120)
        texts, finish, usage, _ = _stream_texts(c.chat.completions.create(
            model="tiny", messages=USER, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert finish == {0: "stop" if usage.completion_tokens < 8 else "length"} and isinstance(texts[0], str)
        with urllib.request.urlopen(url + "/models?api_key=sk-secret-in-query", timeout=60) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "POST /v1/chat/completions 200" in text and "warm-up 1/1" in text
    assert "sk-secret" not in text and "Authorization" not in text


def test_bench_serve_plumbing(loaded, tmp_path):
    """python -m bench.serve end to end on the tiny model: rounds, the same texts in both modes, JSON."""
    from bench.serve import main

    out = tmp_path / "serve.json"
    assert main(["--model", str(loaded.model_dir), "--clients", "2", "--max-tokens", "4", "--rounds", "1",
                 "--warmup-check", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    seq, con = res["rounds"]
    assert (seq["mode"], con["mode"]) == ("sequential", "concurrent")
    assert seq["generate_calls"] == 2 and con["generate_calls"] in (1, 2)  # one call per sequential request
    assert res["summary"]["same_texts_both_modes"] and seq["completion_tokens"] == con["completion_tokens"]
    assert res["summary"]["ratio_concurrent_over_sequential"] == pytest.approx(
        con["tokens_per_s"] / seq["tokens_per_s"])
    first = res["first_request"]  # the cold request vs one after a second server's warm-up
    assert set(first) == {"no_warmup_s", "warmup_took_s", "after_warmup_s"} and min(first.values()) > 0
