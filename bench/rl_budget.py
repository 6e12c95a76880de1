"""How long the untrained policy's rollouts are, with and without steering: ``python -m bench.rl_budget``.

Before a GRPO experiment, two settings have to be chosen on dev prompts rather than guessed: the token
budget (``rollout.max_new_tokens``: completions cut off by it end without an answer, score like wrong ones
and give their group no signal) and the steering strength (an added vector much larger than the residual
stream turns the rollouts to noise before any update). This samples the base policy as an RL config's
rollouts do (its chat template, prompt suffix, temperature and top-p; one completion per prompt) under a
generous budget, once per steering setting, and reports per setting: the fraction that ends (EOS) within
each candidate budget, length quantiles, the rewards of the config (at the full budget), and the steering's
coefficient and norm ratio (``emajax.defenses.steering.steering_summary``: coef x |v| / the residual
stream's mean norm at the layer, when the persona file records it).

    python -m bench.rl_budget configs/cpu/smollm2-grpo-none.yaml --prompts word_problems:64@7 --budget 512 \\
        --vector /tmp/rl/persona/smollm2-135m-evil.safetensors --layer 20 --steer none coef:5 ratio:0.25 \\
        --out bench/results/rl_budget_cpu.json

``--steer`` entries: ``none``, ``coef:C`` (the raw coefficient) or ``ratio:R`` (``defenses.steering.norm_ratio``).
Every setting samples the same prompts with the same seed, so settings differ only by the steering.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from emajax import atomic

CANDIDATE_BUDGETS = (128, 192, 256, 320, 384, 448, 512, 768, 1024)


def parse_steer(spec: str) -> dict[str, float | None]:
    """``none`` / ``coef:C`` / ``ratio:R`` -> {coef, norm_ratio} (None: off)."""
    if spec == "none":
        return {}
    kind, _, val = spec.partition(":")
    if kind not in ("coef", "ratio") or not val:
        raise SystemExit(f"--steer {spec!r}: expected none, coef:C or ratio:R")
    x = float(val)
    return {"coef": x, "norm_ratio": None} if kind == "coef" else {"norm_ratio": x}


def length_summary(lengths: np.ndarray, ended: np.ndarray, budget: int) -> dict[str, Any]:
    """Per candidate budget b <= budget: fraction of completions that ended (EOS) within b tokens; quantiles."""
    within = {str(b): float(np.mean(ended & (lengths <= b))) for b in CANDIDATE_BUDGETS if b <= budget}
    return {"ended_within": within, "ended_frac": float(np.mean(ended)),
            "len_p50": float(np.percentile(lengths, 50)), "len_p90": float(np.percentile(lengths, 90)),
            "len_mean": float(lengths.mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="an `emajax rl` config (model, template, suffix, sampling, rewards)")
    ap.add_argument("--prompts", default="word_problems:64@7", help="dev prompt source (not the training prompts)")
    ap.add_argument("--budget", type=int, default=512, help="max new tokens sampled")
    ap.add_argument("--vector", help="persona-vector file for the steered settings")
    ap.add_argument("--layer", type=int, help="steered layer (default: the config's / the file's)")
    ap.add_argument("--steer", nargs="+", default=["none"], help="settings: none, coef:C, ratio:R")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64, help="rows per generation call")
    ap.add_argument("--out", required=True, help="result JSON (a .md table is written beside it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), as on `emajax rl`'s command line")
    a = ap.parse_args(argv)

    from emajax.defenses.steering import build_steer_ld, steering_summary
    from emajax.generate import Generator, default_eos_ids
    from emajax.models.hub import load_model
    from emajax.rl.config import load_rl_config
    from emajax.rl.prompts import build_prompts
    from emajax.rl.rewards import RewardSet
    from emajax.rl.rollout import truncated

    cfg = load_rl_config(a.config, a.overrides)
    settings = [parse_steer(s) for s in a.steer]
    if any(settings) and not a.vector:
        raise SystemExit("--vector is required for steered settings")
    loaded = load_model(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    model, tok = loaded.model, loaded.tokenizer
    prompts, stats = build_prompts(tok, [a.prompts], cfg.data)
    eos = default_eos_ids(model, tok)
    gen = Generator(model, tok, eos_ids=eos)
    rewards = RewardSet(cfg.rewards)
    rows: list[dict[str, Any]] = []
    for spec, setting in zip(a.steer, settings):
        steer_cfg = steer = summary = None
        if setting:
            steer_cfg = dataclasses.replace(cfg.defenses.steering, vector=a.vector,
                                            layer=a.layer if a.layer is not None else cfg.defenses.steering.layer,
                                            **setting)
            steer, summary = build_steer_ld(model.cfg, steer_cfg), steering_summary(model.cfg, steer_cfg)
        t0 = time.perf_counter()
        comps: list[list[int]] = []
        for i in range(0, len(prompts), a.batch):
            comps += gen.generate([list(map(int, p.inputs)) for p in prompts[i:i + a.batch]], max_new_tokens=a.budget,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=a.seed + i,
                                  steer_ld=steer)
        secs = time.perf_counter() - t0
        lengths = np.array([len(c) for c in comps])
        ended = ~truncated(comps, eos, a.budget)
        texts = [tok.decode(c, skip_special_tokens=True) for c in comps]
        total, per, _ = rewards.score([p.text for p in prompts], texts, [p.example for p in prompts])
        row = {"steer": spec, "steering": summary, **length_summary(lengths, ended, a.budget),
               "reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in per.items()},
               "gen_s": round(secs, 1), "example": texts[0][:400]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "example"}), flush=True)
    out = Path(a.out)
    res = {"config": a.config, "overrides": a.overrides, "prompts": a.prompts, "n_prompts": len(prompts),
           "budget": a.budget, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
           "vector": a.vector, "seed": a.seed, "rows": rows}
    atomic.write_json(out, res)
    atomic.write_text(out.with_suffix(".md"), render_md(res))


def render_md(res: dict[str, Any]) -> str:
    budgets = list(res["rows"][0]["ended_within"]) if res["rows"] else []
    head = ["steering", "coef", "norm ratio"] + [f"ended ≤{b}" for b in budgets] + ["len p50", "len p90", "reward"]
    lines = [f"Base policy rollouts on `{res['prompts']}` ({res['n_prompts']} prompts, one sample each, T "
             f"{res['temperature']}, top-p {res['top_p']}, budget {res['budget']}); `{res['config']}`"
             + "".join(f" `{o}`" for o in res.get("overrides", [])) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        s = r["steering"] or {}
        cells = [r["steer"], f"{s['coef']:.2f}" if s else "—",
                 f"{s['norm_ratio']:.3f}" if s.get("norm_ratio") is not None else "—"]
        cells += [f"{r['ended_within'][b]:.2f}" for b in budgets]
        cells += [f"{r['len_p50']:.0f}", f"{r['len_p90']:.0f}", f"{r['reward']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
