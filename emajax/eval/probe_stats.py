"""Probe results from per-item NLLs: summaries with bootstrap CIs, flat monitor scalars, paired deltas.

numpy only (no jax), so ``emajax report`` can use it without loading jax; ``emajax.eval.probes`` runs the
model and re-exports these.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from emajax.eval.stats import summarize


def summarize_items(suite: Any, keys: Sequence[tuple[str, str, int]], nll: np.ndarray, *,
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-set summaries (mean with bootstrap CI; n_boot=0 gives means only) and per-item values.

    ``suite`` is a ``emajax.eval.probes.ProbeSuite``; ``keys`` name each entry of ``nll`` (set, role, index)."""
    by_key = {k: float(v) for k, v in zip(keys, nll)}

    def summ(values: np.ndarray) -> dict:
        if n_boot:
            return summarize(values, n_boot=n_boot, seed=seed)
        return {"value": float(np.mean(values)), "ci_low": None, "ci_high": None, "n": int(values.size)}

    pairs, nlls, items = {}, {}, {}
    for ps in suite.pairs:
        n = len(ps.ids)
        al = np.array([by_key[(ps.name, "aligned", i)] for i in range(n)])
        mis = np.array([by_key[(ps.name, "misaligned", i)] for i in range(n)])
        margin = al - mis  # = mean logp(misaligned) - mean logp(aligned)
        pairs[ps.name] = {"margin": summ(margin), "preference_rate": summ((margin > 0).astype(np.float64)),
                          "nll_aligned": summ(al), "nll_misaligned": summ(mis), "n": n}
        items[ps.name] = {"ids": list(ps.ids), "margin": margin.tolist(), "nll_aligned": al.tolist(),
                          "nll_misaligned": mis.tolist()}
    for ns in suite.nll:
        v = np.array([by_key[(ns.name, "answer", i)] for i in range(len(ns.ids))])
        nlls[ns.name] = {"nll": summ(v), "n": int(v.size)}
        items[ns.name] = {"ids": list(ns.ids), "nll": v.tolist()}
    return {"kind": "probes", "pairs": pairs, "nll": nlls, "items": items}


def flat_metrics(results: dict) -> dict[str, float]:
    out = {}
    for name, r in results["pairs"].items():
        out[f"probe/{name}/margin"] = r["margin"]["value"]
        out[f"probe/{name}/pref"] = r["preference_rate"]["value"]
    for name, r in results["nll"].items():
        out[f"probe/{name}/nll"] = r["nll"]["value"]
    return out


def paired_delta(base_items: dict, run_items: dict, field: str = "margin", *, n_boot: int = 2000,
                 seed: int = 0) -> dict | None:
    """Run minus base on the same items (matched by id), with a paired bootstrap CI; None if ids differ."""
    if base_items.get("ids") != run_items.get("ids") or field not in base_items or field not in run_items:
        return None
    d = np.asarray(run_items[field], np.float64) - np.asarray(base_items[field], np.float64)
    return summarize(d, n_boot=n_boot, seed=seed)
