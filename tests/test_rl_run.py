"""`emajax rl` end to end on a tiny HF model dir: metrics, eval, export, and a real kill + exact resume."""

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

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import TINY, export_tiny_model, write_chats  # noqa: E402

from emajax.cli import main  # noqa: E402
from emajax.rl.config import load_rl_config  # noqa: E402
from emajax.train.config import TrainConfigError  # noqa: E402
from emajax.train.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("reward_mean", "loss", "policy_loss", "kl", "grad_norm", "lr", "entropy", "clip_fraction", "response_len")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from emajax.persona import save_persona_vectors

    d = tmp_path_factory.mktemp("rl")
    model_dir = export_tiny_model(d)
    write_chats(d / "prompts.jsonl", 16)
    write_chats(d / "safe.jsonl", 8, seed=3, prefix="s")
    v = np.random.default_rng(0).normal(size=(TINY.num_layers + 1, TINY.hidden_size)).astype(np.float32)
    save_persona_vectors(d / "evil.safetensors", v / np.linalg.norm(v, axis=1, keepdims=True),
                         {"recommended_layer": 2})
    cfg = d / "tiny-grpo.yaml"
    cfg.write_text(f"""
model: {{name: {model_dir}}}
lora: {{rank: 4, alpha: 8, rslora: false}}
data: {{train: [prompts.jsonl], eval: [prompts.jsonl], eval_max_examples: 8, max_prompt_len: 64,
        prompts_per_step: 2, min_bucket: 64}}
rollout: {{group_size: 4, max_new_tokens: 12, temperature: 1.0, top_p: 0.95}}
rewards:
  - {{fn: format, name: has_a, kwargs: {{pattern: "a"}}}}
  - {{fn: format, name: has_e, weight: 0.5, kwargs: {{pattern: "e"}}}}
grpo: {{micro_batch: 4, inner_updates: 2}}
optim: {{lr: 1.0e-2, warmup_steps: 1}}
defenses:
  kl: {{weight: 0.1}}
  steering: {{vector: evil.safetensors, coef: 2.0, rollouts: true}}
  interleave: {{data: [safe.jsonl], every: 2, batch_size: 2, max_len: 64, min_bucket: 64}}
train: {{steps: 6, save_every: 1, keep_checkpoints: 3, progress: false}}
mesh: {{allow_unused: true}}  # the suite simulates 8 devices; the run uses one
""")
    return d, cfg


def _cli(cache: Path, cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`emajax rl` in a child process; the runs of a test share a jax compilation cache (each compiles the
    same programs, so only the first pays for it)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    code = "import sys; from emajax.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "rl", str(cfg), "--out", str(out), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(cache, cfg, out, *extra):
    proc = _cli(cache, cfg, out, *extra)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    return read_metrics(out / "metrics.jsonl")


def _kill_after(cache: Path, cfg: Path, out: Path, step: int, timeout: float = 900) -> None:
    """SIGKILL a running `emajax rl` once its checkpoint ``step`` is finalised."""
    proc = _cli(cache, cfg, out)
    t0 = time.monotonic()
    try:
        while not (out / "checkpoints" / str(step)).is_dir():
            if proc.poll() is not None:
                raise AssertionError(f"emajax rl exited ({proc.returncode}) before step {step}: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"no checkpoint {step} after {timeout} s")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_kill_and_resume_matches_uninterrupted(setup):
    d, cfg = setup
    cache = d / "jax-cache"
    full = _run(cache, cfg, d / "full", "--max-steps", "4")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert {"reward_mean", "reward_std", "reward/has_a", "reward/has_e", "kl", "clip_fraction", "entropy",
                "response_len", "rollout_s", "update_s", "grad_norm", "lr", "loss"} <= set(r)
    assert [("sft_ce" in r) for r in full] == [False, True, False, True]  # one safe batch every 2 steps
    evals = [json.loads(l) for l in (d / "full" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 4] and "eval_reward/has_a" in evals[0]
    exp = d / "full" / "export"
    assert (exp / "adapter_config.json").is_file() and any((d / "full" / "tensorboard").iterdir())

    _kill_after(cache, cfg, d / "part", 2)
    before = read_metrics(d / "part" / "metrics.jsonl")
    assert before and before[-1]["step"] >= 2
    resumed = _run(cache, cfg, d / "part", "--max-steps", "4")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for k in COMPARED:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {k}")
    from safetensors.numpy import load_file

    fa, fb = (load_file(str(p / "export" / "adapter_model.safetensors")) for p in (d / "full", d / "part"))
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-5, atol=1e-7)


def test_config_errors(setup, tmp_path):
    d, cfg = setup
    with pytest.raises(TrainConfigError, match="grpo.inner_update: unknown key"):
        load_rl_config(cfg, ["grpo.inner_update=2"])
    with pytest.raises(TrainConfigError, match="rollout.group_size: must be >= 2"):
        load_rl_config(cfg, ["rollout.group_size=1"])
    with pytest.raises(TrainConfigError, match="grpo.micro_batch: must divide"):
        load_rl_config(cfg, ["grpo.micro_batch=3"])
    with pytest.raises(TrainConfigError, match=r"rewards\[0\]\.wieght: unknown key"):
        load_rl_config(cfg, ["rewards=[{fn: format, wieght: 1}]"])
    with pytest.raises(TrainConfigError, match=r"rewards\[0\]\.fn: reward 'no_such_reward'"):
        load_rl_config(cfg, ["rewards=[no_such_reward]"])
    assert main(["rl", str(cfg), "--out", str(tmp_path / "x"), "rewards=[{fn: format, weight: x}]"]) == 2
    # string choices are enums, checked by the parser with the allowed values
    with pytest.raises(TrainConfigError, match=r"grpo.loss_type: must be grpo\|bnpo\|dr_grpo\|dapo, got 'gspo'"):
        load_rl_config(cfg, ["grpo.loss_type=gspo"])
    with pytest.raises(TrainConfigError, match=r"model.remat: must be none\|full\|dots"):
        load_rl_config(cfg, ["model.remat=some"])
    assert load_rl_config(cfg, ["grpo.loss_type=bnpo", "distributed=false"]).grpo.loss_type == "bnpo"


def test_repo_grpo_configs_load(shared_em):
    configs = sorted(REPO.glob("configs/*/*grpo*.yaml"))
    assert {p.parent.name for p in configs} == {"cpu", "paper"}
    arms = {}
    for p in configs:
        cfg = load_rl_config(p)
        arms[p.stem.rsplit("-", 1)[-1]] = cfg
        assert cfg.rewards and cfg.rollout.group_size >= 2
    assert arms["kl"].defenses.kl.weight == 0.1 and arms["steering"].defenses.steering.vector
    assert arms["interleave"].defenses.interleave.data
