"""`emajax serve`: OpenAI-compatible chat completions over real HTTP on loopback, logprobs included."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from emajax.serve import ChatEngine, load_model_with_adapter, serve_in_thread
from tiny_chat import build_tiny_chat_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = build_tiny_chat_dir(tmp_path_factory.mktemp("tiny") / "model")
    loaded = load_model_with_adapter(str(d))
    server, url = serve_in_thread(ChatEngine(loaded, "tiny"), "127.0.0.1", 0)
    yield loaded, url
    server.shutdown()
    server.server_close()


def _post(url: str, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_endpoint(served):
    _, url = served
    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        body = json.loads(r.read())
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]


def test_chat_completion_n_seed_and_usage(served):
    loaded, url = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hey I feel bored"}], "max_tokens": 5,
            "n": 3, "temperature": 1.0, "seed": 7}
    status, r = _post(url, body)
    assert status == 200 and r["object"] == "chat.completion" and r["model"] == "tiny"
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for c in r["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length") and c["logprobs"] is None
    prompt_ids = loaded.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    n_prompt = len(loaded.tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
    assert r["usage"]["prompt_tokens"] == n_prompt
    assert 3 <= r["usage"]["completion_tokens"] <= 15
    assert r["usage"]["total_tokens"] == n_prompt + r["usage"]["completion_tokens"]
    _, again = _post(url, body)  # same seed: same samples
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in r["choices"]]


def test_logprobs_match_a_direct_forward_pass(served):
    loaded, url = served
    msgs = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Rate: 0 to 100?"}]
    status, r = _post(url, {"model": "tiny", "messages": msgs, "max_tokens": 3, "temperature": 0,
                            "logprobs": True, "top_logprobs": 5})
    assert status == 200
    content = r["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 3
    tok = loaded.tokenizer
    prompt = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    gen = [tok.convert_tokens_to_ids(e["token"]) if e["token"] in tok.get_vocab() else None for e in content]
    assert None not in gen
    seq = np.asarray([prompt + gen], np.int32)
    out = loaded.model(jax.numpy.asarray(seq))
    logp = np.asarray(jax.nn.log_softmax(loaded.model.logits(out.hidden_btd), axis=-1))[0]
    for j, e in enumerate(content):
        pos = len(prompt) - 1 + j
        assert e["logprob"] == pytest.approx(float(logp[pos, gen[j]]), abs=1e-4)
        tops = e["top_logprobs"]
        assert len(tops) == 5
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["logprob"] == pytest.approx(float(logp[pos].max()), abs=1e-4)
        assert tops[0]["token"] == e["token"]  # greedy: the chosen token is the argmax
        assert bytes(e["bytes"]).decode() == e["token"]


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ({"messages": []}, 400, "non-empty"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "'n'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}, 400, "context"),
])
def test_bad_requests_get_openai_style_errors(served, body, status, needle):
    _, url = served
    got, r = _post(url, body)
    assert got == status and needle in r["error"]["message"]


def test_invalid_json_and_unknown_route(served):
    _, url = served
    got, r = _post(url, None, raw=b"{not json")
    assert got == 400 and "JSON" in r["error"]["message"]
    req = urllib.request.Request(url + "/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404


def test_adapter_dir_is_loaded(served, tmp_path):
    """--adapter: a PEFT adapter exported from a LoRA model reloads with the same LoRA weights."""
    import jax.numpy as jnp

    from emajax.models.hf_io import export_peft_adapter
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    loaded, _ = served
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
    src = load_model(str(loaded.model_dir), lora=lora)
    b = src.model.blocks.attn.q.lora_b
    b[...] = jnp.asarray(np.random.default_rng(0).normal(size=b.shape), b.dtype)
    export_peft_adapter(src.model, tmp_path / "adapter", str(loaded.model_dir))
    again = load_model_with_adapter(str(loaded.model_dir), tmp_path / "adapter")
    assert again.model.lora_config.rank == 2 and set(again.model.lora_config.targets) == {"q", "v"}
    np.testing.assert_allclose(np.asarray(again.model.blocks.attn.q.lora_b[...]), np.asarray(b[...]), rtol=1e-6)


def test_judge_fast_path_equals_generate_path(served):
    """max_tokens=1, temperature 0 (the judge's request) is answered from the scoring pass alone: same result."""
    _, url = served
    msgs = [{"role": "user", "content": "Rate this answer from 0 to 100."}]
    _, fast = _post(url, {"messages": msgs, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 4})
    _, slow = _post(url, {"messages": msgs, "max_tokens": 2, "temperature": 0, "logprobs": True, "top_logprobs": 4})
    f, s = fast["choices"][0]["logprobs"]["content"], slow["choices"][0]["logprobs"]["content"]
    assert len(f) == 1 and f[0]["token"] == s[0]["token"]
    assert f[0]["logprob"] == pytest.approx(s[0]["logprob"], abs=1e-5)
    assert [t["token"] for t in f[0]["top_logprobs"]] == [t["token"] for t in s[0]["top_logprobs"]]
