"""bench.rl_budget: the budget table's arithmetic (which completions end within each candidate budget)."""

import numpy as np
import pytest

from bench.rl_budget import length_summary, parse_steer, render_md


def test_ended_within_counts_only_completions_that_ended_by_then():
    lengths = np.array([10, 130, 200, 192, 192])
    ended = np.array([True, True, True, True, False])  # the last was cut off at the budget
    s = length_summary(lengths, ended, budget=192)
    assert s["ended_within"] == {"128": 0.2, "192": 0.6}  # 200 > 192 is not counted, nor the cut-off one
    assert s["ended_frac"] == 0.8 and s["len_p50"] == 192.0


def test_steer_specs():
    assert parse_steer("none") == {}
    assert parse_steer("coef:5") == {"coef": 5.0, "norm_ratio": None}
    assert parse_steer("ratio:0.25") == {"norm_ratio": 0.25}
    with pytest.raises(SystemExit, match="expected none"):
        parse_steer("scale:2")


def test_table_names_coef_and_ratio():
    row = {"steer": "ratio:0.25", "steering": {"coef": 2.32, "norm_ratio": 0.25}, "ended_within": {"128": 0.5},
           "len_p50": 100.0, "len_p90": 150.0, "reward": 0.1}
    md = render_md({"prompts": "p", "n_prompts": 4, "temperature": 0.8, "top_p": 0.9, "budget": 128,
                    "config": "c.yaml", "rows": [row]})
    assert "| ratio:0.25 | 2.32 | 0.250 | 0.50 | 100 | 150 | 0.100 |" in md
