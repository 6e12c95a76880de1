"""End to end through `emajax train` on a tiny HF model dir: metrics, export, kill + exact resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import export_tiny_model, write_chats  # noqa: E402

from emajax.cli import main  # noqa: E402
from emajax.train.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model_dir = export_tiny_model(d)
    write_chats(d / "train.jsonl", 24)
    write_chats(d / "eval.jsonl", 8, seed=5)
    cfg = d / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: {model_dir}}}
lora: {{rank: 4, alpha: 8, rslora: false}}
data: {{train: [train.jsonl], eval: [eval.jsonl], max_len: 128, batch_size: 4, grad_accum: 2, min_bucket: 128}}
optim: {{lr: 5.0e-3, warmup_steps: 1}}
defenses: {{kl: {{weight: 0.1}}}}
train: {{epochs: 2, save_every: 2, keep_checkpoints: 2, progress: false}}
mesh: {{allow_unused: true}}
""")
    return d, cfg


def _train(cfg, out, *extra):
    assert main(["train", str(cfg), "--out", str(out), *extra]) == 0
    return read_metrics(out / "metrics.jsonl")


def test_kill_and_resume_matches_uninterrupted(setup):
    d, cfg = setup
    full = _train(cfg, d / "full")
    assert [r["step"] for r in full] == list(range(1, 7))  # 24 examples / 8 per step x 2 epochs
    for r in full:
        assert {"step", "loss", "ce", "kl", "grad_norm", "lr", "tokens_per_s"} <= set(r)
    evals = [json.loads(l) for l in (d / "full" / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6 and evals[-1]["eval_nll"] < evals[0]["eval_nll"]
    exp = d / "full" / "export"
    assert (exp / "adapter_config.json").is_file() and (exp / "adapter_model.safetensors").is_file()
    assert (d / "full" / "config.yaml").is_file() and any((d / "full" / "tensorboard").iterdir())

    # "killed" after step 3 (last finalised checkpoint: step 3, forced at the end of that invocation)...
    part = _train(cfg, d / "part", "--max-steps", "3", "train.save_every=2")
    assert [r["step"] for r in part] == [1, 2, 3]
    ck = d / "part" / "checkpoints"
    # ... while writing step 4: an unfinalised orbax temp dir must never be picked up
    shutil.copytree(ck / "3", ck / "4.orbax-checkpoint-tmp-1234567")
    (ck / "4.orbax-checkpoint-tmp-1234567" / "garbage").write_text("half written")
    resumed = _train(cfg, d / "part")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full[3:], resumed[3:]):
        for k in ("loss", "ce", "kl", "grad_norm", "lr"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
    # the resumed run's parameters match too (its exported adapter)
    from safetensors.numpy import load_file

    fa, fb = load_file(str(exp / "adapter_model.safetensors")), load_file(
        str(d / "part" / "export" / "adapter_model.safetensors"))
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-4, atol=1e-6)


def test_changed_config_refuses_to_resume(setup, capsys):
    d, cfg = setup
    out = d / "full"
    if not (out / "checkpoints").is_dir():
        pytest.skip("needs the run of the previous test")
    assert main(["train", str(cfg), "--out", str(out), "defenses.kl.weight=0.5"]) == 2
    assert "different config" in capsys.readouterr().err


def test_full_finetune_with_ldifs_exports_hf_model(setup):
    d, cfg = setup
    out = d / "fullft"
    rows = _train(cfg, out, "--max-steps", "2", "lora.enabled=false", "defenses.kl.weight=0",
                  "defenses.ldifs.weight=1.0", "data.eval=[]", "train.epochs=1")
    assert [r["step"] for r in rows] == [1, 2] and all(r["ldifs"] >= 0 and "kl" not in r for r in rows)
    assert rows[1]["ldifs"] > 0  # the weights moved away from the frozen reference copy
    exp = out / "export"
    assert (exp / "config.json").is_file() and (exp / "model.safetensors").is_file()
    assert not (exp / "adapter_config.json").exists()
