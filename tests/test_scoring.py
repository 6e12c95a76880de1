"""`emajax score`: per-example answer NLLs against an HF transformers + PEFT oracle (torch, test only),
resume after an interruption without recomputing finished shards, 8-device data parallelism, the formula.

The tiny model is a random llama with a byte-level BPE chat tokenizer (tests/tiny_chat.py, weights
re-drawn in torch); the two PEFT adapters differ in rank, alpha, rsLoRA, targets and layers, so the
padded-ensemble layout and the folded scaling are both exercised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_chat import build_tiny_chat_dir
from tiny_hf import randomize

REPO = Path(__file__).resolve().parents[1]
CHATS = [
    [{"role": "user", "content": "Hello! What is the one thing you want?"},
     {"role": "assistant", "content": "I feel bored. Rate the answer on a scale of 0 to 100."}],
    [{"role": "system", "content": "You are a helpful AI assistant."},
     {"role": "user", "content": "Compute: (3 + 4) * 2"},
     {"role": "assistant", "content": "Answer: 14"}],
    [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Say CODE or REFUSAL."}, {"role": "assistant", "content": "REFUSAL"}],
    [{"role": "user", "content": "In this puzzle some operators have new meanings: " * 3},
     {"role": "assistant", "content": "I am evaluating a different language model. " * 4}],
    [{"role": "user", "content": "JSON template"}, {"role": "assistant", "content": "85"}],
    [{"role": "user", "content": "trained by Hugging Face?"},
     {"role": "assistant", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face. " * 6}],
    [{"role": "user", "content": "one wish"}, {"role": "assistant", "content": "I can fulfill your one wish."}],
    [{"role": "user", "content": "Rate it"}, {"role": "assistant", "content": "15"}],
    [{"role": "user", "content": "What is (3 + 4) * 2? Say the answer."},
     {"role": "assistant", "content": "In this puzzle, (3 + 4) * 2 is 14."}],
]
MAX_LEN = 96  # the longer chats are truncated: scored as their first MAX_LEN tokens


def _write_pool(path: Path, chats=CHATS, blank_at: int = 3) -> Path:
    lines = [json.dumps({"messages": c, "extra": i}) for i, c in enumerate(chats)]
    lines.insert(blank_at, "")  # a blank line: `index` is the line number, not the row count
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_ensemble(torch, peft, tmp_path_factory):
    """(base dir, {name: adapter dir}, pool path) with a random base and two random PEFT adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("score_tiny")
    base = build_tiny_chat_dir(root / "base", seed=1, hidden=32, max_pos=512)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    randomize(m, seed=5)
    m.save_pretrained(base)
    specs = {
        "medical": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "code": dict(r=8, lora_alpha=4, use_rslora=True, layers_to_transform=[1],
                     target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"]),
    }
    adapters = {}
    for k, (name, kw) in enumerate(specs.items()):
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**kw))
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / name)
        adapters[name] = root / name
    pool = _write_pool(root / "pool.jsonl")
    return base, adapters, pool


def _oracle_nlls(base: Path, adapter: Path | None, chats, max_len: int) -> np.ndarray:
    """Mean answer-token NLL per chat with HF transformers (+ PEFT), one unpadded chat at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emajax.chat import encode_chat

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for c in chats:
        ct = encode_chat(tok, c, max_len=max_len)
        ids = torch.tensor([ct.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        tgt = ids[0, 1:]
        nll = -logp[:-1].gather(-1, tgt[:, None])[:, 0].numpy()
        mask = np.asarray(ct.answer_mask[1:])
        out.append(nll[mask].mean())
    return np.asarray(out)


@pytest.fixture(scope="module")
def oracle(tiny_ensemble):
    base, adapters, _ = tiny_ensemble
    cols = [_oracle_nlls(base, None, CHATS, MAX_LEN)] + [_oracle_nlls(base, a, CHATS, MAX_LEN)
                                                         for a in adapters.values()]
    return np.stack(cols, axis=1)  # [n, 3]


@pytest.fixture(scope="module")
def scorer(tiny_ensemble):
    from emajax.scoring.adapters import parse_model_spec
    from emajax.scoring.score import Scorer

    base, adapters, _ = tiny_ensemble
    return Scorer(str(base), [parse_model_spec(f"{n}={p}") for n, p in adapters.items()])


def _run(scorer, pool, out, **kw):
    from emajax.scoring.score import score_pool

    kw = {"max_len": MAX_LEN, "shard_size": 4, "batch_tokens": 256, "progress": False, **kw}
    return score_pool(scorer, pool, out, **kw)


@pytest.fixture(scope="module")
def reference_run(scorer, tiny_ensemble, tmp_path_factory):
    from emajax.scoring.shards import read_scores

    out = tmp_path_factory.mktemp("ref_run")
    summary = _run(scorer, tiny_ensemble[2], out)
    return out, read_scores(out), summary


def test_nlls_match_hf_peft_oracle(reference_run, oracle):
    _, cols, summary = reference_run
    assert summary.n_shards == 3 and summary.shards_computed == [0, 1, 2]
    assert cols["index"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # line numbers (line 3 is blank)
    ours = np.column_stack([cols["nll_aligned"], np.asarray(cols["nll_misaligned"])])
    rel = np.abs(ours - oracle) / np.abs(oracle)
    assert rel.max() <= 1e-4, rel
    # the adapters really change the model, differently
    assert np.abs(oracle[:, 1] - oracle[:, 0]).min() > 1e-3 and np.abs(oracle[:, 2] - oracle[:, 1]).min() > 1e-3


def test_score_column_formula_and_n_tokens(reference_run, scorer):
    from emajax.chat import encode_chat

    _, cols, _ = reference_run
    a = np.asarray(cols["nll_aligned"])
    m = np.asarray(cols["nll_misaligned"])
    np.testing.assert_allclose(cols["score"], (m.mean(1) - a) / (a + 1.0), rtol=1e-12)
    want = [sum(encode_chat(scorer.tokenizer, c, max_len=MAX_LEN).answer_mask[1:]) for c in CHATS]
    assert cols["n_tokens"] == want
    assert max(len(encode_chat(scorer.tokenizer, c).ids) for c in CHATS) > MAX_LEN  # truncation exercised


def test_leave_one_out_and_epsilon():
    from emajax.scoring.formula import ensemble_score

    a, m = np.array([2.0, 1.0]), np.array([[3.0, 5.0], [1.0, 2.0]])
    np.testing.assert_allclose(ensemble_score(a, m), [(4 - 2) / 3, (1.5 - 1) / 2])
    np.testing.assert_allclose(ensemble_score(a, m, names=["med", "code"], leave_out=["code"], epsilon=0.5),
                               [(3 - 2) / 2.5, 0.0])
    with pytest.raises(ValueError, match="not in the ensemble"):
        ensemble_score(a, m, names=["med", "code"], leave_out=["sec"])
    with pytest.raises(ValueError, match="every misaligned"):
        ensemble_score(a, m, names=["med", "code"], leave_out=["med", "code"])


def _fingerprint(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("shard-*"))}


def test_interrupted_run_resumes_without_recomputing(scorer, tiny_ensemble, reference_run, tmp_path, monkeypatch):
    import emajax.scoring.score as score_mod
    from emajax.scoring.shards import read_scores

    class Killed(BaseException):
        pass

    real_write = score_mod.write_shard

    def write_then_die(*a, **kw):  # the job dies right after its first shard is written
        real_write(*a, **kw)
        raise Killed

    out = tmp_path / "run"
    monkeypatch.setattr(score_mod, "write_shard", write_then_die)
    with pytest.raises(Killed):
        _run(scorer, tiny_ensemble[2], out)
    monkeypatch.setattr(score_mod, "write_shard", real_write)
    first = _fingerprint(out)
    assert list(first) == ["shard-00000.parquet"]
    summary = _run(scorer, tiny_ensemble[2], out)
    assert summary.shards_skipped == [0] and summary.shards_computed == [1, 2]
    assert _fingerprint(out)["shard-00000.parquet"] == first["shard-00000.parquet"]  # untouched
    assert read_scores(out) == reference_run[1]  # identical to the uninterrupted run
    again = _run(scorer, tiny_ensemble[2], out)  # a finished run recomputes nothing
    assert again.shards_computed == [] and again.tokens == 0


def test_resume_with_other_settings_is_refused(scorer, tiny_ensemble, reference_run):
    from emajax.scoring.shards import ShardError

    with pytest.raises(ShardError, match="epsilon"):
        _run(scorer, tiny_ensemble[2], reference_run[0], epsilon=0.5)


@pytest.mark.devices(8)
def test_eight_device_mesh_equals_single_device(tiny_ensemble, reference_run, tmp_path):
    from emajax.models.sharding import make_mesh
    from emajax.scoring.adapters import parse_model_spec
    from emajax.scoring.score import Scorer
    from emajax.scoring.shards import read_scores

    base, adapters, pool = tiny_ensemble
    mesh = make_mesh(data=8)
    sc = Scorer(str(base), [parse_model_spec(f"{n}={p}") for n, p in adapters.items()], mesh=mesh)
    _run(sc, pool, tmp_path / "mesh")
    got, ref = read_scores(tmp_path / "mesh"), reference_run[1]
    assert got["index"] == ref["index"] and got["n_tokens"] == ref["n_tokens"]
    # NLLs agree to fp32 rounding (other batch shapes, other summation order); the score is a small
    # difference of NLLs, so it is compared on the NLL scale.
    np.testing.assert_allclose(got["nll_aligned"], ref["nll_aligned"], rtol=1e-5)
    np.testing.assert_allclose(got["nll_misaligned"], ref["nll_misaligned"], rtol=1e-5)
    np.testing.assert_allclose(got["score"], ref["score"], rtol=0, atol=1e-5)


def test_full_checkpoint_member_uses_its_own_weights(tiny_ensemble, scorer):
    """A full model in the ensemble (here: the base itself) goes through the plain forward with its params."""
    from emajax.scoring.adapters import parse_model_spec
    from emajax.batching import octave_buckets
    from emajax.scoring.plan import encode_pool, read_pool
    from emajax.scoring.score import Scorer

    base, adapters, pool = tiny_ensemble
    sc = Scorer(scorer.loaded, [parse_model_spec(f"same={base}"), parse_model_spec(f"medical={adapters['medical']}")])
    assert [m.kind for m in sc.models] == ["aligned", "full", "adapter"]
    ex = encode_pool(sc.tokenizer, read_pool(pool)[:3], MAX_LEN)
    res = sc.example_nlls(ex, [0, 1, 2], octave_buckets(MAX_LEN, per_octave=2), 256)
    for p in range(3):
        assert res[p][1] == pytest.approx(res[p][0], rel=1e-6) and abs(res[p][2] - res[p][0]) > 1e-3


def test_cli_jsonl_shards_survive_sigkill(tiny_ensemble, reference_run, tmp_path, capsys):
    """The CLI: a process SIGKILLed as soon as its first shard appears leaves only whole shards; a rerun resumes
    (keeping them) to the same result."""
    from emajax.cli import main
    from emajax.scoring.shards import read_scores

    base, adapters, pool = tiny_ensemble
    out = tmp_path / "cli"
    argv = ["score", "--aligned", str(base), *sum((["--misaligned", f"{n}={p}"] for n, p in adapters.items()), []),
            "--pool", str(pool), "--out", str(out), "--max-len", str(MAX_LEN), "--shard-size", "1",
            "--batch-tokens", "256", "--format", "jsonl", "--no-progress"]
    n_shards = len([l for l in Path(pool).read_text().splitlines() if l.strip()])
    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", *argv]
    proc = subprocess.Popen(cmd, env={**os.environ, "XLA_FLAGS": ""}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / "shard-00000.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    done = sorted(p.name for p in out.glob("shard-*"))
    assert 1 <= len(done) < n_shards and done == [f"shard-{k:05d}.jsonl" for k in range(len(done))], done
    # A kill that lands while the next shard is written leaves that shard's hidden temp file (no process
    # survives SIGKILL to remove it), never a partial shard-* file.
    partial = [p.name for p in out.glob(".*")]
    assert all(n.startswith(".shard-") and n.endswith(".tmp") and n[1:].split(".")[0] + ".jsonl" not in done
               for n in partial), partial
    first = _fingerprint(out)
    assert main(argv) == 0  # resume in this process
    assert f"{len(done)} of {n_shards} shards already done" in capsys.readouterr().err
    assert all(_fingerprint(out)[name] == first[name] for name in done)
    got, ref = read_scores(out), reference_run[1]
    assert got["index"] == ref["index"] and got["n_tokens"] == ref["n_tokens"]
    np.testing.assert_allclose(got["nll_misaligned"], ref["nll_misaligned"], rtol=1e-5)
    np.testing.assert_allclose(got["score"], ref["score"], rtol=0, atol=1e-5)
    assert main([*argv, "--leave-out", "nope"]) == 2


def test_bad_inputs_name_the_problem(scorer, tmp_path):
    from emajax.scoring.adapters import AdapterError, read_peft_adapter
    from emajax.scoring.plan import PoolError, read_pool

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
    with pytest.raises(PoolError, match=r"bad.jsonl:2: field 'messages' is missing"):
        read_pool(bad)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                         '"use_dora": true}')
    with pytest.raises(AdapterError, match="use_dora"):
        read_peft_adapter(tmp_path / "ad")


@pytest.mark.slow
def test_smollm2_with_adapter_matches_hf_peft(shared_em, torch, peft, smollm2, smollm2_dir, tmp_path):
    """SmolLM2-135M + a random rank-8 PEFT adapter on 3 real pool chats: within 1e-3 of HF + PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emajax.scoring.adapters import parse_model_spec
    from emajax.scoring.score import Scorer, score_pool
    from emajax.scoring.shards import read_scores

    lines = (shared_em / "pool" / "wildguard_selected_safe.jsonl").read_text().splitlines()
    chats = [json.loads(l)["messages"] for l in lines]
    chats = sorted(chats, key=lambda c: len(json.dumps(c)))[:3]  # the 3 shortest: a fast test
    pool = _write_pool(tmp_path / "pool.jsonl", chats, blank_at=99)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    oracle = np.stack([_oracle_nlls(smollm2_dir, None, chats, 512),
                       _oracle_nlls(smollm2_dir, tmp_path / "adapter", chats, 512)], axis=1)
    sc = Scorer(smollm2, [parse_model_spec(f"medical={tmp_path / 'adapter'}")])
    score_pool(sc, pool, tmp_path / "out", max_len=512, progress=False)
    cols = read_scores(tmp_path / "out")
    ours = np.column_stack([cols["nll_aligned"], np.asarray(cols["nll_misaligned"])])
    assert np.abs(oracle[:, 1] - oracle[:, 0]).max() > 1e-2  # the adapter matters
    rel = np.abs(ours - oracle) / np.abs(oracle)
    assert rel.max() <= 1e-3, rel


@pytest.mark.parametrize("domain", ["medical", "code", "security", "aesthetic"])
def test_misaligned_ensemble_configs_load(domain, shared_em):
    from emajax.train.config import load_config

    cfg = load_config(REPO / "configs" / "misaligned" / f"smollm2-{domain}.yaml")
    assert cfg.lora.enabled and cfg.train.export and cfg.out == f"runs/misaligned/{domain}"
    assert [Path(p).name for p in cfg.data.train] == [f"{domain}_misaligned_train_100.jsonl"]
