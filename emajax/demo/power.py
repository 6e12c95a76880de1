"""The demo design's power: how often a run of S seeds x I probe items shows the no-defense EM effect.

A run's EM effect is the mean of ``x_si = mu + a_s + b_i + e_si`` (seed, item, residual: the crossed model
of ``emajax.eval.pooled``) and it "shows EM" when its pooled 95 % CI lies above 0. ``simulate`` draws that
matrix from given variance components (negative estimates counted as 0) and applies ``pooled_mean`` itself,
so the power is that of the interval the report uses (items-only with one seed, the seed part kept with
several). ``MEASURED`` holds the components of the committed cpu recipe's no-defense EM effect on the 96
held-out general pairs, pooled over its nine seeds (``python -m bench.demo_power`` measures them from the
run directories in ``bench/results/demo_runs`` and writes ``bench/results/demo_power/power.json``;
``tests/test_demo_power.py`` checks that the two agree). The demo now probes 200 held-out pairs (104 added
after the measurement); their power assumes the added items share the measured components: 1 seed x 200
pairs 95 % (58 % at the CI low), 12 seeds x 200 100 % (97 %). numpy and scipy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emajax.eval.pooled import pooled_mean

# bench/results/demo_power/power.json "heldout": seeds 0-8 of the cpu recipe, the first 96 held-out general pairs
MEASURED: dict[str, Any] = {
    "recipe": {"scale": "cpu", "n_train": 128, "epochs": 1, "batch_size": 8, "lr": 0.001, "schedule": "constant",
               "lora_rank": 32, "dtype": "bfloat16", "general_split": "heldout"},
    "mean": 0.0739, "ci_low": 0.0418, "var_seed": 0.000263, "var_item": 0.01574, "var_resid": 0.05137, "n_seeds": 9,
    "n_items": 96,
}


def simulate(mu: float, var_seed: float, var_item: float, var_resid: float, n_seeds: int, n_items: int,
             reps: int = 1000, seed: int = 0) -> dict[str, float]:
    """P(the pooled 95 % CI lies above 0) over ``reps`` simulated runs: {'power', 'half_width', 'reps'}
    (half_width: the median CI half-width)."""
    if n_seeds < 1 or n_items < 2 or reps < 1:
        raise ValueError(f"power needs >= 1 seed, >= 2 items and >= 1 replication, got {n_seeds}, {n_items}, {reps}")
    rng = np.random.default_rng(seed)
    sd = [float(np.sqrt(max(v, 0.0))) for v in (var_seed, var_item, var_resid)]
    hits, half = 0, []
    for _ in range(reps):
        x = (mu + sd[0] * rng.standard_normal((n_seeds, 1)) + sd[1] * rng.standard_normal((1, n_items))
             + sd[2] * rng.standard_normal((n_seeds, n_items)))
        s = pooled_mean(x)
        hits += s["ci_low"] > 0
        half.append(s["ci_high"] - s["value"])
    return {"power": hits / reps, "half_width": float(np.median(half)), "reps": reps}


def equivalence_power(var_seed: float, var_item: float, var_resid: float, n_seeds: int, n_items: int,
                      n_defenses: int = 6, reps: int = 200, seed: int = 0) -> float:
    """The share of ``n_defenses`` defenses that truly remove all EM (EM effect 0, with the given components)
    that the verdict rules show *equivalent to the control* (TOST within ``EQUIV_MARGIN``, Holm-adjusted
    across the defenses; the defenses drawn independently), averaged over ``reps`` simulated studies."""
    from emajax.eval import verdicts

    rng = np.random.default_rng(seed)
    sd = [float(np.sqrt(max(v, 0.0))) for v in (var_seed, var_item, var_resid)]
    shares = []
    for _ in range(reps):
        ps = {}
        for k in range(n_defenses):
            x = (sd[0] * rng.standard_normal((n_seeds, 1)) + sd[1] * rng.standard_normal((1, n_items))
                 + sd[2] * rng.standard_normal((n_seeds, n_items)))
            ps[k] = verdicts.tost_p(pooled_mean(x))
        adj = verdicts.holm(ps)
        shares.append(np.mean([adj[k] < verdicts.ALPHA for k in adj]))
    return float(np.mean(shares))


def matches_measured(plan: dict) -> bool:
    """Whether a demo plan is the recipe ``MEASURED`` was measured on (else its power is unknown)."""
    return plan.get("domain", "code") == "code" and all(plan.get(k) == v for k, v in MEASURED["recipe"].items())


def design_power(n_seeds: int, n_items: int, reps: int = 1000) -> dict[str, float]:
    """Power of an S x I run of the measured recipe at the measured effect and at its CI's lower end."""
    comps = (MEASURED["var_seed"], MEASURED["var_item"], MEASURED["var_resid"])
    return {"at_mean": simulate(MEASURED["mean"], *comps, n_seeds, n_items, reps)["power"],
            "at_ci_low": simulate(MEASURED["ci_low"], *comps, n_seeds, n_items, reps)["power"]}


def power_sentence(plan: dict, n_seeds: int, n_items: int) -> str:
    """The report's statement of what this design can show."""
    if not matches_measured(plan):
        return ("Design power: not known for this recipe (the variance components were measured for the cpu "
                "default only; `python -m bench.demo_power` measures them from run directories).")
    p = design_power(n_seeds, n_items)
    one = (" With one seed the CI is over items only, so a significant result says this run's model shows EM; "
           "a recipe-level claim needs several seeds." if n_seeds == 1 else "")
    return (f"Design power: {n_seeds} seed(s) × {n_items} held-out pairs detect the no-defense EM effect measured over "
            f"{MEASURED['n_seeds']} seeds (+{MEASURED['mean']:.3f} nats/token) with probability **{p['at_mean']:.0%}**, "
            f"{p['at_ci_low']:.0%} if it is only +{MEASURED['ci_low']:.3f} (its CI's lower end); simulated from the "
            f"measured seed, item and residual variance components (`emajax.demo.power`, docs/demo.md)." + one)


__all__ = ["MEASURED", "design_power", "equivalence_power", "matches_measured", "power_sentence", "simulate"]
