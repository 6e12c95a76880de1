"""GRPO reward curves per defense arm and seed: ``python -m bench.rl_curves run|report``.

``run`` trains every (config, seed) with ``emajax rl`` in chunks: each chunk is one child process that
stops cleanly after as many steps as fit in ``--chunk-min`` minutes (estimated from the run's own step
times; a timeout a few minutes later is the safety net), optionally holding ``--lock`` (a flock file) only
while it runs, so other jobs get the machine between chunks. ``emajax rl`` resumes from the run's
checkpoint, so re-running the command continues where it stopped. A run's wall time counts from each
chunk's start (once it holds the lock) to its end: load, compiles, steps, export. ``--steps N`` stops every run at step N
(with a constant learning rate that is the run of N steps). Each run directory keeps ``chunks.json``
(wall seconds and steps of each chunk).

``report`` reads the run directories (``<arm>-s<seed>``) and writes, to ``--out``: each run's
``metrics.jsonl``, ``eval.jsonl``, ``config.yaml`` and ``chunks.json`` (the raw results), ``summary.json``
and ``summary.md`` (per arm: training reward over the first and last ``--window`` steps, mean over seeds
with a t-interval, and the last steps against no defense paired by (seed, step) - in a seed every arm sees
the same prompts at a step - with a bootstrap CI and with the seeds as the unit (a t-interval over the seeds' paired means); per run: its
steering as it ran, the same, the greedy held-out reward at the
start and end when the runs have ``data.eval``, wall time, rollout and update seconds) and
``reward_curves.png`` (mean over seeds per arm, the seeds' range as a band).

    python -m bench.rl_curves run --runs /tmp/rl/steer --configs configs/cpu/smollm2-grpo-{none,steering-rollouts,steering-trainonly}.yaml \\
        --seeds 0 1 2 --steps 14 --lock /tmp/emajax-heavy.lock -- 'data.eval=[]'
    python -m bench.rl_curves report --runs /tmp/rl/steer --out bench/results/rl_steering_cpu --window 4 \\
        --contrast steering-rollouts steering-trainonly

Overrides after ``--`` reach every arm, so ``run`` refuses one that sets a defense (the control would get it too).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emajax import atomic
from emajax.eval.stats import bootstrap_ci

REPO = Path(__file__).resolve().parents[1]


def arm_of(config: str | Path) -> str:
    """``smollm2-grpo-kl.yaml`` -> ``kl``, ``smollm2-grpo-steering-trainonly.yaml`` -> ``steering-trainonly``."""
    stem = Path(config).stem
    return stem.split("-grpo-", 1)[1] if "-grpo-" in stem else stem.rsplit("-", 1)[-1]


def _rows(path: Path) -> list[dict[str, Any]]:
    return atomic.read_jsonl(path)  # [] when missing


def _planned_steps(run_dir: Path) -> int | None:
    stats = run_dir / "data_stats.json"
    return atomic.read_json(stats, SystemExit)["total_steps"] if stats.is_file() else None


def run_one(config: Path, seed: int, out: Path, overrides: list[str], chunk_s: float, lock: str | None,
            first_step_s: float, steps: int | None = None, jax_cache: Path | None = None) -> None:
    """Train (config, seed) to the end, or to ``steps`` (a constant-LR run stopped there is the run of that
    length), in chunks (see module doc)."""
    import os

    chunks_path = out / "chunks.json"
    env = dict(os.environ)
    if jax_cache is not None:  # the runs compile the same programs: only the first of each shape pays
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    while True:
        done = len(_rows(out / "metrics.jsonl"))
        total = _planned_steps(out)
        if total is not None and steps is not None:
            total = min(total, steps)
        if total is not None and done >= total and (steps is not None or (out / "export").is_dir()):
            return
        times = [r["step_time_s"] for r in _rows(out / "metrics.jsonl")[-10:]]
        per_step = statistics.median(times) if times else first_step_s
        budget = chunk_s - (120 if done else 300)  # load, compiles, evals
        stop = done + max(1, int(budget / per_step))
        if steps is not None:
            stop = min(stop, steps)
        cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "rl", str(config),
               "--out", str(out), "--max-steps", str(stop), f"train.seed={seed}", "train.progress=false", *overrides]
        cmd = ["timeout", str(int(chunk_s + 600)), *cmd]
        marker = out.parent / f".{out.name}.started"  # the chunk's start once it holds the lock
        out.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        if lock:
            cmd = ["flock", lock, "sh", "-c", 'date +%s.%N > "$0" && exec "$@"', str(marker), *cmd]
        print(f"[rl_curves] {out.name}: steps {done} -> {stop}", flush=True)
        t_ask = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        chunks = atomic.read_json(chunks_path, SystemExit) if chunks_path.is_file() else []
        steps_after = len(_rows(out / "metrics.jsonl"))
        metrics = _rows(out / "metrics.jsonl")
        started = float(marker.read_text()) if marker.is_file() else t_ask
        chunks.append({"from_step": done, "to_step": steps_after, "asked_at": t_ask, "started_at": started,
                       "ended_at": time.time(),
                       "returncode": proc.returncode,
                       "step_time_s": sum(r["step_time_s"] for r in metrics[done:steps_after])})
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(chunks_path, chunks, indent=1)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            if steps_after <= done:
                raise SystemExit(f"[rl_curves] {out.name}: emajax rl failed (exit {proc.returncode}): " + " | ".join(tail))
            print(f"[rl_curves] {out.name}: chunk ended with exit {proc.returncode} after step {steps_after}; "
                  "resuming", flush=True)
        total = _planned_steps(out)
        if total is not None and steps is not None:
            total = min(total, steps)
        if total is not None and stop >= total and proc.returncode == 0:
            return


# ----------------------------------------------------------------------------------------------- report
def _boot_diff(a: np.ndarray, b: np.ndarray, paired: bool, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile CI of mean(b) - mean(a); ``paired``: the CI of the mean pairwise difference."""
    if paired:
        return bootstrap_ci(np.asarray(b) - np.asarray(a), n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    d = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(1) - a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(1)
    lo, hi = np.quantile(d, [0.025, 0.975])
    return float(lo), float(hi)


def _eval_vec(row: dict[str, Any]) -> np.ndarray:
    per = row["per_prompt"]
    w = row.get("weights", {})
    return sum(np.asarray(v, np.float64) * w.get(k, 1.0) for k, v in per.items())


def steering_of(run_dir: Path, cfg: dict[str, Any]) -> str:
    """The steering a run trained with, as the run recorded it: ``off``, or layer, coefficient, norm ratio
    (``data_stats.json``, when the run logged it) and whether the rollouts were steered."""
    st = ((cfg.get("defenses") or {}).get("steering") or {})
    if not st.get("vector"):
        return "off"
    stats = atomic.read_json(run_dir / "data_stats.json", SystemExit) if (run_dir / "data_stats.json").is_file() else {}
    used = stats.get("steering") or {}
    layer = used.get("layer", st.get("layer"))
    coef = used.get("coef", st.get("coef"))
    text = f"layer {layer if layer is not None else 'file default'}, coef {coef:.2f}"
    if used.get("norm_ratio") is not None:
        text += f" (ratio {used['norm_ratio']:.2f})"
    return text + (", rollouts steered" if st.get("rollouts", True) else ", rollouts unsteered")


def check_overrides(overrides: list[str]) -> None:
    """An override reaches every arm, the control included: a defense set there is no control any more."""
    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("defenses.")]
    if bad:
        raise SystemExit(f"[rl_curves] {', '.join(bad)}: a defense override would apply to every arm, the no-defense "
                         "control included; set it in the arm's config instead")


def summarize_run(run_dir: Path, window: int) -> dict[str, Any]:
    import yaml

    m = _rows(run_dir / "metrics.jsonl")
    ev = _rows(run_dir / "eval.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    weights = {(r.get("name") or r["fn"].rsplit(".", 1)[-1].rsplit(":", 1)[-1]): r["weight"] for r in cfg["rewards"]}
    chunks = atomic.read_json(run_dir / "chunks.json", SystemExit) if (run_dir / "chunks.json").is_file() else []
    r = np.array([x["reward_mean"] for x in m])
    first, last = r[:window], r[-window:]
    out: dict[str, Any] = {
        "run": run_dir.name, "steps": len(m), "seed": cfg["train"]["seed"], "steering": steering_of(run_dir, cfg),
        "train_reward_first": float(first.mean()), "train_reward_last": float(last.mean()),
        "train_reward_delta": float(last.mean() - first.mean()),
        "train_reward_delta_ci": _boot_diff(first, last, paired=False),
        "per_function_first": {k.split("/", 1)[1]: float(np.mean([x[k] for x in m[:window]])) for k in m[0]
                               if k.startswith("reward/")},
        "per_function_last": {k.split("/", 1)[1]: float(np.mean([x[k] for x in m[-window:]])) for k in m[0]
                              if k.startswith("reward/")},
        "kl_last": float(np.mean([x["kl"] for x in m[-window:]])) if "kl" in m[0] else None,
        "response_len_first": float(np.mean([x["response_len"] for x in m[:window]])),
        "response_len_last": float(np.mean([x["response_len"] for x in m[-window:]])),
        "zero_std_groups_mean": float(np.mean([x["zero_std_groups"] for x in m])) if "zero_std_groups" in m[0] else None,
        "truncated_frac_last": float(np.mean([x["truncated_frac"] for x in m[-window:]])) if "truncated_frac" in m[0] else None,
        "rollout_s_median": float(np.median([x["rollout_s"] for x in m[1:]])),
        "update_s_median": float(np.median([x["update_s"] for x in m[1:]])),
        "step_time_s_sum": float(sum(x["step_time_s"] for x in m)),
        "eval_time_s_sum": float(sum(e.get("eval_s", 0.0) for e in ev)),
        "wall_s": float(sum(c["ended_at"] - c.get("started_at", c["asked_at"]) for c in chunks)) if chunks else None,
        "chunks": len(chunks),
    }
    if len(ev) >= 2 and "per_prompt" in ev[0]:
        e0, e1 = ({**e, "weights": weights} for e in (ev[0], ev[-1]))
        a, b = _eval_vec(e0), _eval_vec(e1)
        out.update(eval_start=float(a.mean()), eval_end=float(b.mean()), eval_delta=float(b.mean() - a.mean()),
                   eval_delta_ci=_boot_diff(a, b, paired=True), eval_n=len(a),
                   eval_per_function_start={k: float(np.mean(v)) for k, v in ev[0]["per_prompt"].items()},
                   eval_per_function_end={k: float(np.mean(v)) for k, v in ev[-1]["per_prompt"].items()},
                   _eval_end_vec=b.tolist())
    return out


def _arm(run_dir: Path) -> str:
    return run_dir.name.rsplit("-s", 1)[0]


def _paired_vs_none(arm_runs: dict[int, Path], none_runs: dict[int, Path], window: int) -> dict[str, Any]:
    """Training reward of an arm minus no defense's, paired by (seed, step): in a seed the step's prompts are
    the same in every arm (the prompt order is a function of the seed and the step), so the difference at a
    step compares the two policies on the same prompts. Over the last ``window`` steps of each seed; 95 %
    bootstrap CI over the (seed, step) pairs, and per seed."""
    pairs, per_seed = [], []
    for seed, d in sorted(arm_runs.items()):
        if seed not in none_runs:
            continue
        a = {x["step"]: x["reward_mean"] for x in _rows(d / "metrics.jsonl")}
        b = {x["step"]: x["reward_mean"] for x in _rows(none_runs[seed] / "metrics.jsonl")}
        steps = sorted(set(a) & set(b))[-window:]
        diff = np.array([a[t] - b[t] for t in steps])
        if not len(diff):
            continue
        pairs.append(diff)
        per_seed.append({"seed": seed, "steps": [steps[0], steps[-1]], "train_last_minus_none": float(diff.mean()),
                         "ci": bootstrap_ci(diff)})
    if not pairs:
        return {}
    d = np.concatenate(pairs)
    out = {"train_last_minus_none": float(d.mean()), "ci": bootstrap_ci(d), "n_pairs": int(len(d)),
           "per_seed": per_seed}
    if len(per_seed) >= 2:  # seeds as the unit: each seed's paired mean, t-interval over seeds
        out["seed_level"] = _mean_ci([p["train_last_minus_none"] for p in per_seed])
    return out


def _mean_ci(x: list[float]) -> dict[str, Any]:
    """Mean over seeds with a t-interval (95 %) and the seeds' range."""
    a = np.asarray(x, np.float64)
    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    df = len(a) - 1
    half = float(t975.get(df, 1.96) * a.std(ddof=1) / np.sqrt(len(a))) if df else float("nan")
    return {"mean": float(a.mean()), "ci": [float(a.mean() - half), float(a.mean() + half)],
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def report(runs: Path, out: Path, window: int, contrasts: list[tuple[str, str]] = ()) -> dict[str, Any]:
    dirs = sorted(d for d in runs.iterdir() if (d / "metrics.jsonl").is_file())
    if not dirs:
        raise SystemExit(f"[rl_curves] no runs under {runs}")
    out.mkdir(parents=True, exist_ok=True)
    per_run = [summarize_run(d, window) for d in dirs]
    for d in dirs:
        dst = out / d.name
        dst.mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl", "config.yaml", "chunks.json", "data_stats.json"):
            if (d / name).is_file():
                shutil.copy2(d / name, dst / name)
    by_arm: dict[str, dict[int, Path]] = {}
    for d, r in zip(dirs, per_run):
        by_arm.setdefault(_arm(d), {})[r["seed"]] = d
    runs_of = {arm: [r for d, r in zip(dirs, per_run) if _arm(d) == arm] for arm in by_arm}
    per_arm = {}
    for arm, rs in runs_of.items():
        a: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "train_reward_first": _mean_ci([r["train_reward_first"] for r in rs]),
            "train_reward_last": _mean_ci([r["train_reward_last"] for r in rs]),
            "train_reward_delta": _mean_ci([r["train_reward_delta"] for r in rs]),
            "wall_s": [r["wall_s"] for r in rs],
            "step_time_s_sum": [r["step_time_s_sum"] for r in rs]}
        if all("eval_delta" in r for r in rs):
            a["eval_delta"] = [r["eval_delta"] for r in rs]
        if arm != "none" and "none" in by_arm:
            a["vs_none"] = _paired_vs_none(by_arm[arm], by_arm["none"], window)
            ev = []
            for r in rs:  # held-out (greedy) reward at the end, paired over the eval prompts
                b = next((x for x in runs_of["none"] if x["seed"] == r["seed"]), None)
                if b is not None and "_eval_end_vec" in r and "_eval_end_vec" in b:
                    x, y = np.asarray(b["_eval_end_vec"]), np.asarray(r["_eval_end_vec"])
                    ev.append({"seed": r["seed"], "eval_end_minus_none": float(y.mean() - x.mean()),
                               "ci": _boot_diff(x, y, paired=True)})
            if ev:
                a["eval_vs_none"] = ev
        per_arm[arm] = a
    for r in per_run:
        r.pop("_eval_end_vec", None)
    summary = {"window": window, "runs": per_run, "arms": per_arm}
    if contrasts:  # arm a minus arm b, paired as each arm against no defense
        missing = [x for c in contrasts for x in c if x not in by_arm]
        if missing:
            raise SystemExit(f"[rl_curves] --contrast: no runs of arm(s) {', '.join(sorted(set(missing)))}")
        summary["contrasts"] = {f"{a} - {b}": _paired_vs_none(by_arm[a], by_arm[b], window) for a, b in contrasts}
    atomic.write_json(out / "summary.json", summary, indent=1)
    atomic.write_text(out / "summary.md", _markdown(summary))
    plot(by_arm, out / "reward_curves.png", window)
    plot(by_arm, out / "mechanism.png", 1, keys=MECHANISM_KEYS)
    return summary


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        if any(v != v for v in x):  # NaN: one seed has no interval over seeds
            return "[n/a: 1 seed]"
        return f"[{x[0]:+.{nd}f}, {x[1]:+.{nd}f}]"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _markdown(s: dict[str, Any]) -> str:
    w = s["window"]
    lines = [f"| arm | seeds | training reward, first {w} steps [95% CI over seeds] | last {w} steps | "
             f"rise (last − first) | last {w} minus no defense, paired by (seed, step) [95% CI] | "
             "the same, seeds as the unit [95% t-CI over seeds] | wall min per run |", "|" + "---|" * 8]
    for arm, a in sorted(s["arms"].items(), key=lambda kv: (kv[0] != "none", kv[0])):
        m = lambda k: f"{a[k]['mean']:.3f} {_f(a[k]['ci'])}"  # noqa: E731
        v = a.get("vs_none") or {}
        lines.append(" | ".join([f"| {arm}", str(len(a["seeds"])), m("train_reward_first"), m("train_reward_last"),
                                 f"{a['train_reward_delta']['mean']:+.3f} {_f(a['train_reward_delta']['ci'])}",
                                 f"{v['train_last_minus_none']:+.3f} {_f(v['ci'])}" if v else "-",
                                 f"{v['seed_level']['mean']:+.3f} {_f(v['seed_level']['ci'])}" if "seed_level" in v else "-",
                                 ", ".join(_f(x / 60, 1) for x in a["wall_s"] if x)]) + " |")
    lines += ["", f"| run | steering | steps | train reward, first {w} | last {w} | Δ [95% CI] | eval start | eval end | "
              "eval Δ [95% CI, paired] | KL (last) | len first → last | truncated (last) | groups without signal | "
              "rollout s | update s | wall min |", "|" + "---|" * 16]
    for r in s["runs"]:
        lines.append(" | ".join([f"| {r['run']}", r.get("steering", "-"), str(r["steps"]), _f(r["train_reward_first"]),
                                 _f(r["train_reward_last"]), f"{r['train_reward_delta']:+.3f} {_f(r['train_reward_delta_ci'])}",
                                 _f(r.get("eval_start")), _f(r.get("eval_end")),
                                 f"{r['eval_delta']:+.3f} {_f(r['eval_delta_ci'])}" if "eval_delta" in r else "-",
                                 _f(r["kl_last"], 4), f"{r['response_len_first']:.0f} → {r['response_len_last']:.0f}",
                                 _f(r["truncated_frac_last"], 2), _f(r["zero_std_groups_mean"], 2),
                                 _f(r["rollout_s_median"], 1), _f(r["update_s_median"], 1),
                                 _f(r["wall_s"] / 60, 1) if r["wall_s"] else "-"]) + " |")
    per_seed = [(arm, v) for arm, a in s["arms"].items() for v in (a.get("vs_none") or {}).get("per_seed", [])]
    if per_seed:
        lines += ["", f"| arm | seed | training reward minus no defense, last {w} steps [95% CI over steps] |",
                  "|---|---|---|"]
        lines += [f"| {arm} | {v['seed']} | {v['train_last_minus_none']:+.3f} {_f(v['ci'])} |" for arm, v in per_seed]
    if s.get("contrasts"):
        lines += ["", f"| contrast | last {w} steps, paired by (seed, step) [95% CI] | seeds as the unit [95% t-CI] | per seed |",
                  "|---|---|---|---|"]
        for name, v in s["contrasts"].items():
            if not v:
                continue
            sl = v.get("seed_level")
            lines.append(f"| {name} | {v['train_last_minus_none']:+.3f} {_f(v['ci'])} | "
                         + (f"{sl['mean']:+.3f} {_f(sl['ci'])}" if sl else "-") + " | "
                         + ", ".join(f"s{p['seed']} {p['train_last_minus_none']:+.3f}" for p in v["per_seed"]) + " |")
    ev = [(arm, v) for arm, a in s["arms"].items() for v in a.get("eval_vs_none", [])]
    if ev:
        lines += ["", "| arm | seed | held-out reward at the end minus no defense [95% CI, paired over prompts] |",
                  "|---|---|---|"]
        lines += [f"| {arm} | {v['seed']} | {v['eval_end_minus_none']:+.3f} {_f(v['ci'])} |" for arm, v in ev]
    return "\n".join(lines) + "\n"


# what a step's rollouts and update looked like: cut off by the budget, groups without signal (all rewards
# equal), the policy's KL to the unsteered reference, its entropy, the completions' length
MECHANISM_KEYS = ("truncated_frac", "zero_std_groups", "kl", "entropy", "response_len")


def plot(by_arm: dict[str, dict[int, Path]], path: Path, window: int, keys: tuple[str, ...] | None = None) -> None:
    """Per arm: the seeds' mean per step (moving average over ``window`` steps), the band spanning the
    seeds; panels for the total reward and each reward function, or for ``keys`` (those the runs log)."""
    from emajax.eval.plots import _color, _plt, _save

    plt = _plt()
    arms = sorted(by_arm, key=lambda a: (a != "none", a))
    first = _rows(next(iter(by_arm[arms[0]].values())) / "metrics.jsonl")
    if keys is None:
        keys = ["reward_mean"] + sorted(k for k in first[0] if k.startswith("reward/"))
    keys = [k for k in keys if k in first[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.0), layout="constrained", squeeze=False)
    for i, arm in enumerate(arms):
        ms = [_rows(d / "metrics.jsonl") for _, d in sorted(by_arm[arm].items())]
        n = min(len(m) for m in ms)
        steps = np.array([x["step"] for x in ms[0][:n]])
        k = min(window, n)
        for ax, key in zip(axes[0], keys):
            y = np.array([[x[key] for x in m[:n]] for m in ms])  # [seeds, steps]
            y = np.stack([np.convolve(r, np.ones(k) / k, mode="valid") for r in y])
            ax.plot(steps[k - 1:], y.mean(0), color=_color(i), lw=1.8, label=f"{arm} ({len(ms)} seeds)")
            ax.fill_between(steps[k - 1:], y.min(0), y.max(0), color=_color(i), alpha=0.15, lw=0)
    for ax, key in zip(axes[0], keys):
        ax.set_title(("training reward" if key == "reward_mean" else key) +
                     "\n(mean over seeds, band = seeds' range" + (f"; moving avg {k})" if k > 1 else ")"), fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rl_curves", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--runs", type=Path, required=True, help="directory of the run directories (<arm>-s<seed>)")
    r.add_argument("--configs", nargs="+", required=True, help="one config per arm, named ...-<arm>.yaml")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--chunk-min", type=float, default=44.0, help="minutes per child process (per lock hold)")
    r.add_argument("--first-step-s", type=float, default=90.0, help="step time assumed before a run has one")
    r.add_argument("--lock", default=None, help="flock this file while a chunk runs")
    r.add_argument("--steps", type=int, default=None, help="stop every run after this many steps (constant LR)")
    r.add_argument("--jax-cache", type=Path, default=None, help="persistent compilation cache shared by the runs")
    r.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    rep = sub.add_parser("report")
    rep.add_argument("--runs", type=Path, required=True)
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    rep.add_argument("--contrast", nargs=2, action="append", default=[], metavar=("A", "B"),
                     help="also report arm A minus arm B over the last steps, paired by (seed, step) (repeatable)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        check_overrides(list(args.overrides))
        for seed in args.seeds:  # seed-major: after one pass every arm has a finished run
            for config in args.configs:
                run_one(Path(config).resolve(), seed, args.runs.resolve() / f"{arm_of(config)}-s{seed}",
                        list(args.overrides), args.chunk_min * 60, args.lock, args.first_step_s, args.steps,
                        args.jax_cache)
        return 0
    s = report(args.runs, args.out, args.window, [tuple(c) for c in args.contrast])
    print(_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
