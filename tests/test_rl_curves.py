"""bench.rl_curves report: per-arm summaries and the pairing of each arm with no defense by (seed, step)."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bench.rl_curves import arm_of, check_overrides, report  # noqa: E402


def test_arm_names_from_config_names():
    assert arm_of("configs/cpu/smollm2-grpo-kl.yaml") == "kl"
    assert arm_of("smollm2-grpo-steering-trainonly.yaml") == "steering-trainonly"


def test_defense_overrides_are_refused():
    """An override reaches the no-defense control too (how an earlier experiment steered its control)."""
    check_overrides(["data.eval=[]", "rollout.max_new_tokens=64"])
    with pytest.raises(SystemExit, match="control included"):
        check_overrides(["data.eval=[]", "defenses.steering.vector=/tmp/evil.safetensors"])


def _run(root, name, seed, rewards):
    d = root / name
    d.mkdir(parents=True)
    rows = [{"step": i + 1, "reward_mean": r, "reward/format": r, "kl": 0.0, "response_len": 10.0,
             "rollout_s": 1.0, "update_s": 2.0, "step_time_s": 3.0} for i, r in enumerate(rewards)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.yaml").write_text(f"train: {{seed: {seed}}}\nrewards: [{{fn: format, weight: 1.0}}]\n")
    (d / "chunks.json").write_text(json.dumps([{"asked_at": 0.0, "started_at": 10.0, "ended_at": 70.0}]))


def test_report_pairs_arms_with_no_defense_by_seed_and_step(tmp_path):
    rng = np.random.default_rng(0)
    base = {s: rng.uniform(0, 1, size=8) for s in (0, 1)}
    shift = np.linspace(-0.2, 0.1, 8)  # the arm's difference at each step, the same in both seeds
    for s in (0, 1):
        _run(tmp_path / "runs", f"none-s{s}", s, base[s])
        _run(tmp_path / "runs", f"kl-s{s}", s, base[s] + shift)
    out = tmp_path / "out"
    summary = report(tmp_path / "runs", out, window=3, contrasts=[("kl", "none"), ("none", "kl")])
    vs = summary["arms"]["kl"]["vs_none"]
    assert summary["contrasts"]["kl - none"]["train_last_minus_none"] == pytest.approx(vs["train_last_minus_none"])
    assert summary["contrasts"]["none - kl"]["train_last_minus_none"] == pytest.approx(-vs["train_last_minus_none"])
    assert "| none - kl |" in (out / "summary.md").read_text()
    assert vs["n_pairs"] == 6
    assert vs["train_last_minus_none"] == pytest.approx(shift[-3:].mean())
    assert [v["seed"] for v in vs["per_seed"]] == [0, 1]
    assert vs["seed_level"]["mean"] == pytest.approx(shift[-3:].mean())  # both seeds' paired means agree:
    assert vs["seed_level"]["ci"] == pytest.approx([shift[-3:].mean()] * 2)  # a zero-width interval over seeds
    none = summary["arms"]["none"]
    firsts = [base[s][:3].mean() for s in (0, 1)]
    assert none["train_reward_first"]["mean"] == pytest.approx(np.mean(firsts))
    lo, hi = none["train_reward_first"]["ci"]
    half = 12.706 * np.std(firsts, ddof=1) / np.sqrt(2)  # t(0.975, 1 df)
    assert (lo, hi) == pytest.approx((np.mean(firsts) - half, np.mean(firsts) + half))
    assert none["wall_s"] == [60.0, 60.0]  # from the chunk's start under the lock, not from asking
    assert (out / "reward_curves.png").stat().st_size > 0
    assert (out / "mechanism.png").stat().st_size > 0  # the logged kl and response_len per step
    assert (out / "kl-s1" / "metrics.jsonl").is_file()
    assert "| kl | 2 |" in (out / "summary.md").read_text()
    assert "| kl-s0 | off | 8 |" in (out / "summary.md").read_text()  # each run's steering, as it ran


def test_steering_column_reads_what_the_run_used(tmp_path):
    from bench.rl_curves import steering_of

    d = tmp_path / "steering-trainonly-s0"
    d.mkdir()
    (d / "data_stats.json").write_text(json.dumps({"steering": {"layer": 20, "coef": 0.93, "norm_ratio": 0.1}}))
    cfg = {"defenses": {"steering": {"vector": "v.safetensors", "layer": 20, "coef": 5.0, "norm_ratio": 0.1,
                                     "rollouts": False}}}
    assert steering_of(d, cfg) == "layer 20, coef 0.93 (ratio 0.10), rollouts unsteered"
    old = {"defenses": {"steering": {"vector": "v.safetensors", "layer": None, "coef": 5.0}}}  # no data_stats entry
    assert steering_of(tmp_path, old) == "layer file default, coef 5.00, rollouts steered"
    assert steering_of(tmp_path, {"defenses": {"kl": {"weight": 0.1}}}) == "off"
