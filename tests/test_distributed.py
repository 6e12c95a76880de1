"""Two processes x 4 simulated CPU devices as one jax.distributed system (`emajax launch`, gloo
collectives) against one process with 8 devices: losses, cooperative orbax checkpoints with a kill
and resume, export of weights sharded across the processes, and `emajax score` shards.

Each launch starts two fresh Python processes (imports + compile): a few of them keep this file
near half a minute on a 2-core machine, so the training checks share one killed-and-resumed run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch import LAUNCH_TIMEOUT_S, finish, gloo_available, launch  # noqa: E402
from _train_tiny import export_tiny_model, tiny_model, tiny_tokenizer, write_chats  # noqa: E402

import jax  # noqa: E402

from emajax.cli import main  # noqa: E402
from emajax.train.metrics import read_metrics  # noqa: E402

pytestmark = [pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no CPU (gloo) collectives option"),
              pytest.mark.devices(8)]  # the one-process references run on the suite's 8 simulated CPU devices


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    model_dir = export_tiny_model(d)
    write_chats(d / "train.jsonl", 48)
    cfg = d / "tiny.yaml"
    # Full fine-tuning (every kernel sharded over fsdp=8, so export must gather across processes), with
    # KL to the frozen reference copy and LDIFS on; 6 steps of 8 rows, a checkpoint after every step.
    cfg.write_text(f"""
model: {{name: {model_dir}}}
lora: {{enabled: false}}
data: {{train: [train.jsonl], max_len: 64, batch_size: 8, grad_accum: 1, min_bucket: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 1}}
defenses: {{kl: {{weight: 0.1}}, ldifs: {{weight: 1.0, layers: [2, 4]}}}}
train: {{epochs: 1, save_every: 1, keep_checkpoints: 3, progress: false, tensorboard: false}}
mesh: {{data: 1, fsdp: 8, tensor: 1}}
""")
    return d, cfg


@pytest.fixture(scope="module")
def one_process_run(tiny_setup):
    """The uninterrupted reference: this process, 8 devices, mesh fsdp=8."""
    d, cfg = tiny_setup
    assert main(["train", str(cfg), "--out", str(d / "one")]) == 0
    return d / "one"


@pytest.fixture(scope="module")
def killed_and_resumed_run(tiny_setup):
    """2 processes x 4 devices: killed (both, SIGKILL) once checkpoint 2 is final, then relaunched."""
    d, cfg = tiny_setup
    out = d / "two"
    p = launch(["train", str(cfg), "--out", str(out)], d / "launch1.log")
    ck = out / "checkpoints" / "2"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not ck.is_dir() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    log1 = (d / "launch1.log").read_text(errors="replace")
    assert ck.is_dir(), f"checkpoint 2 never appeared:\n{log1[-4000:]}"
    steps = sorted(int(c.name) for c in (out / "checkpoints").iterdir() if c.name.isdigit())
    killed_at = steps[-1]
    assert killed_at < 6, f"the run finished before it was killed (checkpoints {steps}); the test proves nothing"
    # The relaunch builds the same 8-way fsdp axis as a hybrid mesh: 4 devices per process (ICI) x 2
    # processes (DCN, each process a slice), which must not change a number.
    log2 = finish(launch(["train", str(cfg), "--out", str(out), "mesh.fsdp=4", "mesh.dcn_fsdp=2"], d / "launch2.log"),
                  d / "launch2.log")
    return out, killed_at, log1, log2


def test_two_processes_equal_one_process_and_resume_exactly(one_process_run, killed_and_resumed_run):
    out, killed_at, _, log2 = killed_and_resumed_run
    assert f"resumed from {out / 'checkpoints'}/{killed_at}" in log2
    assert "[p0]" in log2 and "[p1]" in log2
    ref, got = read_metrics(one_process_run / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(ref, got):
        for k in ("loss", "ce", "kl", "ldifs", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-9, err_msg=f"step {a['step']} {k}")
    assert got[-1]["kl"] > 0 and got[-1]["ldifs"] > 0  # the reference terms were live


def test_export_of_weights_sharded_across_processes(one_process_run, killed_and_resumed_run):
    """The kernels live on 8 devices of 2 processes (fsdp=8): export gathers them; same HF directory."""
    from safetensors.numpy import load_file

    a, b = one_process_run / "export", killed_and_resumed_run[0] / "export"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_two_process_score_shards_merge_to_one_process_scores(tmp_path):
    from emajax.models.hf_io import export_hf, export_peft_adapter
    from emajax.scoring.shards import read_scores

    from _train_tiny import TINY  # noqa: F401  (the tiny architecture the adapter is built on)

    base = export_hf(tiny_model(lora=None, seed=3), tmp_path / "base", tiny_tokenizer())
    lora_model = tiny_model(seed=3)
    for lin in (lora_model.blocks.attn.q, lora_model.blocks.mlp.down):
        lin.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(7), lin.lora_b.shape))
    adapter = export_peft_adapter(lora_model, tmp_path / "adapter", base_model_name_or_path=str(base))
    pool = write_chats(tmp_path / "pool.jsonl", 20, seed=4)
    args = ["score", "--aligned", str(base), "--misaligned", f"med={adapter}", "--pool", str(pool),
            "--max-len", "64", "--shard-size", "8", "--batch-tokens", "512", "--data-parallel", "-1",
            "--format", "jsonl", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finish(launch([*args, "--out", str(tmp_path / "two")], tmp_path / "score.log"), tmp_path / "score.log")
    one, two = read_scores(tmp_path / "one"), read_scores(tmp_path / "two")
    assert len(list((tmp_path / "two").glob("shard-*.jsonl"))) == 3
    assert one["index"] == two["index"] and one["n_tokens"] == two["n_tokens"]
    np.testing.assert_allclose(two["nll_aligned"], one["nll_aligned"], rtol=1e-5)
    np.testing.assert_allclose(two["nll_misaligned"], one["nll_misaligned"], rtol=1e-5)
    np.testing.assert_allclose(two["score"], one["score"], rtol=0, atol=1e-5)
