"""bench.demo_cost splits an arm's stage wall time into steps, the first step's compile excess, probes and
the rest, from the files a demo run writes."""

from __future__ import annotations

import json

import pytest

from bench.demo_cost import arm_cost, seed_costs


def _arm(d, step_times, probe_seconds):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "step_time_s": t}) + "\n"
                                             for i, t in enumerate(step_times)))
    for k, s in enumerate(probe_seconds):
        name = "probes.json" if k == 0 else f"probes_step{k * 8}.json"
        (d / name).write_text(json.dumps({"seconds": s}))


def test_arm_and_seed_cost(tmp_path):
    _arm(tmp_path / "seed_0" / "arms" / "none", [7.0, 2.0, 2.0, 2.0], [10.0, 5.0])
    _arm(tmp_path / "seed_0" / "benign" / "kl", [3.0, 1.0, 1.0], [2.0])
    (tmp_path / "timings.json").write_text(json.dumps({"stages": {
        "data": {"wall_s": 1.0}, "seed 0: train none": {"wall_s": 30.0}, "seed 0: benign kl": {"wall_s": 9.0},
        "seed 0: Interleaving++ selection": {"wall_s": 4.0}}}))
    c = arm_cost(tmp_path / "seed_0" / "arms" / "none", 30.0)
    # the first step costs one median step plus a 5 s compile excess
    assert c == {"wall_s": 30.0, "steps_s": 8.0, "n_steps": 4, "median_step_s": 2.0, "compile_excess_s": 5.0,
                 "probes_s": 15.0, "rest_s": 2.0}
    s = seed_costs(tmp_path)[0]
    assert set(s["arms"]) == {"train none", "benign kl"}
    assert s["total"]["wall_s"] == pytest.approx(39.0) and s["total"]["rest_s"] == pytest.approx(2.0 + 9 - 3 - 2 - 2)
    assert s["plain_ce_rest_and_compile_s"] == pytest.approx(7.0)  # only 'none' is a plain-CE arm here
