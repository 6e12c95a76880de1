"""The dose study: how the EM effect of no defense (vs the control arm) grows with training.

    emajax demo --dose-steps 8 16 32 64 --seeds 3 --out runs/dose [--lr 1e-3] [--dtype float32]

Trains the no-defense and control arms of the demo's ``cpu`` recipe for max(steps) optimiser steps
(one epoch over max(steps) x batch examples, constant learning rate after warmup, so the model at an
intermediate step is an honest shorter dose) and probes each at every listed step. Only the **dev**
part of the general pairs is used here (the demo's reported figures use the held-out part, which never
decides anything). Per step it pools over seeds and items (``emajax.eval.pooled``): the EM effect
(general margin, no defense minus control), each arm's change vs the base model, narrow learning
(in-domain margin vs control) and the coherence proxy (word-problem NLL vs control). Writes
``dose.json``, ``dose.md`` and ``dose.png``; resumable like the demo (one run directory per arm and seed).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from emajax.demo.pipeline import Demo, DoseProbe, Timer, _fmt_probe, enable_compile_cache
from emajax.demo.plan import CONTROL, DemoPlan, label_of
from emajax import atomic
from emajax.eval.pooled import pooled_mean
from emajax.eval.report import format_estimate

DOSE_ARMS = ("none", CONTROL)
# plan fields that change what the study trains or probes (the others, e.g. the benign arms', do not)
DOSE_KEYS = ("model", "n_train", "n_probe_code", "general_split", "n_general", "n_benign", "probe_data", "n_security",
             "epochs", "batch_size", "max_len", "lr", "schedule", "warmup_steps", "lora_rank", "lora_alpha", "dtype",
             "param_dtype", "data_seed", "probe_batch", "probe_max_len", "probe_bucket")


def dose_plan(plan: DemoPlan, steps: Sequence[int]) -> DemoPlan:
    """The plan's recipe sized for the study: one epoch of max(steps) steps, dev general pairs, constant lr."""
    if not steps or min(steps) < 1:
        raise ValueError(f"--dose-steps must be positive step counts, got {list(steps)}")
    return dataclasses.replace(plan, n_train=max(steps) * plan.batch_size, epochs=1, general_split="dev",
                               schedule="constant", monitor_every=0)


class DoseStudy:
    def __init__(self, plan: DemoPlan, out: str | Path, seeds: Sequence[int], steps: Sequence[int],
                 arms: Sequence[str] = DOSE_ARMS, log: Any = None):
        self.steps = sorted(set(int(s) for s in steps))
        self.plan = dose_plan(plan, self.steps)
        self.arms = list(dict.fromkeys([*DOSE_ARMS, *arms]))
        self.demo = Demo(self.plan, out, seeds=tuple(seeds), **({"log": log} if log else {}))
        self.out, self.log = self.demo.out, self.demo.log

    def run_dir(self, seed: int, arm: str) -> Path:
        return self.out / f"seed_{seed}" / arm

    def done(self, seed: int, arm: str) -> bool:
        return all((self.run_dir(seed, arm) / f"probes_step{t}.json").is_file() for t in self.steps)

    def base_probes(self) -> None:
        res = self.demo.runner("narrow")(self.demo.base_loaded().model)
        atomic.write_json(self.out / "base" / "probes.json", {**res, "method": "base", "step": 0})
        self.log(f"  base: {_fmt_probe(res)}")

    def train(self, seed: int, arm: str) -> None:
        from emajax.train.loop import train

        if arm == "steering" or arm == "interleave_pp":
            raise ValueError(f"the dose study trains control and plain defenses; {arm!r} needs the demo's extra stages")
        run_dir = self.run_dir(seed, arm)
        cfg = self.demo.train_config(arm, seed)
        cfg.train.save_every = min(self.steps)
        cfg.out = str(run_dir)
        meta = {"method": arm, "label": label_of(arm), "seed": seed}
        atomic.write_json(run_dir / "method.json", meta)
        train(cfg, run_dir, callback=DoseProbe(run_dir, self.demo.runner("narrow"), self.steps, meta, self.log))

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.demo._check_plan(DOSE_KEYS)
        enable_compile_cache(self.out / "xla_cache")
        timer = Timer(self.out / "timings.json", self.log)
        timer.run("data", self.demo.write_data, skip=(self.demo.data / "control_train.jsonl").is_file())
        timer.run("base probes", self.base_probes, skip=(self.out / "base" / "probes.json").is_file())
        for seed in self.demo.seeds:
            for arm in self.arms:
                timer.run(f"seed {seed}: train {arm}", lambda s=seed, a=arm: self.train(s, a), skip=self.done(seed, arm))
        timer.finish()
        return write_dose_report(self.out)


# ----------------------------------------------------------------------------- summary
def _items(path: Path, set_name: str, field: str) -> np.ndarray | None:
    if not path.is_file():
        return None
    it = json.loads(path.read_text())["items"].get(set_name)
    return None if it is None else np.asarray(it[field], np.float64)


def _step_times(run_dir: Path) -> list[float]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return [r["step_time_s"] for r in rows[1:] if "step_time_s" in r]  # the first step compiles


def summarize_dose(out: str | Path) -> dict:
    """Per probed step: pooled figures over the seeds where both arms reached it."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    base = out / "base" / "probes.json"
    seeds = sorted(int(p.name[5:]) for p in out.glob("seed_*") if p.name[5:].isdigit())
    arms = sorted({p.name for s in seeds for p in (out / f"seed_{s}").iterdir() if p.is_dir()})
    steps = sorted({int(p.stem.split("step")[1]) for p in out.glob("seed_*/*/probes_step*.json")})
    rows = []
    for t in steps:
        have = [s for s in seeds if all((out / f"seed_{s}" / a / f"probes_step{t}.json").is_file()
                                        for a in DOSE_ARMS)]
        if not have:
            continue
        row: dict[str, Any] = {"step": t, "examples_seen": t * plan["batch_size"], "seeds": have}

        def mat(arm: str, set_name: str, field: str) -> np.ndarray:
            return np.stack([_items(out / f"seed_{s}" / arm / f"probes_step{t}.json", set_name, field) for s in have])

        for set_name, field, key in (("general", "margin", "em"), ("in_domain", "margin", "narrow"),
                                     ("benign", "nll", "coherence")):
            b0 = _items(base, set_name, field)
            ctl = mat(CONTROL, set_name, field)
            row[f"{key}_control_vs_base"] = pooled_mean(ctl - b0[None])
            for arm in [a for a in arms if a != CONTROL and all(
                    (out / f"seed_{s}" / a / f"probes_step{t}.json").is_file() for s in have)]:
                x = mat(arm, set_name, field)
                sfx = "" if arm == "none" else f"_{arm}"
                row[f"{key}_effect{sfx}"] = pooled_mean(x - ctl)
                row[f"{key}_vs_base{sfx}"] = pooled_mean(x - b0[None])
        rows.append(row)
    times = {a: [t for s in seeds for t in _step_times(out / f"seed_{s}" / a)] for a in arms}
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    return {"kind": "demo_dose", "plan": {k: plan[k] for k in ("model", "lr", "schedule", "warmup_steps", "batch_size",
                                                                "max_len", "dtype", "param_dtype", "lora_rank",
                                                                "lora_alpha", "n_train", "general_split")},
            "arms": arms, "seeds": seeds, "rows": rows,
            "step_time_s_median": {a: round(statistics.median(v), 3) for a, v in times.items() if v},
            "stage_loadavg_1m": {k: v.get("loadavg_1m") for k, v in timings.get("stages", {}).items()}}


def dose_table(d: dict) -> str:
    lines = ["| steps | examples | seeds | EM effect (none − control) | none vs base | control vs base | "
             "narrow (in-domain margin, none − control) | benign NLL (none − control) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['step']} | {r['examples_seen']} | {len(r['seeds'])} | {format_estimate(r.get('em_effect'), signed=True)} | "
                     f"{format_estimate(r.get('em_vs_base'), signed=True)} | {format_estimate(r.get('em_control_vs_base'), signed=True)} | "
                     f"{format_estimate(r.get('narrow_effect'), signed=True)} | {format_estimate(r.get('coherence_effect'), signed=True)} |")
    return "\n".join(lines)


def write_dose_report(out: str | Path) -> Path:
    from emajax.eval.plots import dose_png

    out = Path(out)
    d = summarize_dose(out)
    atomic.write_json(out / "dose.json", d)
    p = d["plan"]
    n_items = d["rows"][0]["em_effect"]["n_items"] if d["rows"] else 0
    png = dose_png([(f"lr {p['lr']:g}, {p['dtype']}", d["rows"])], out / "dose.png")
    text = [f"# Dose study: {p['model']}, lr {p['lr']:g} ({p['schedule']} after {p['warmup_steps']} warmup), batch "
            f"{p['batch_size']}, {p['dtype']} compute", "",
            f"General margins on the {n_items} **dev** general pairs; means over seeds x items with crossed "
            f"random-effects 95 % CIs (paired: same seed and item in both arms). Median step time (s): "
            + ", ".join(f"{a} {v}" for a, v in d["step_time_s_median"].items()) + ".", "",
            dose_table(d), "", f"![dose]({png.name})", ""]
    return atomic.write_text(out / "dose.md", "\n".join(text))


def run_dose(plan: DemoPlan, out: str | Path, seeds: Sequence[int], steps: Sequence[int],
             arms: Sequence[str] = DOSE_ARMS, log: Any = None) -> Path:
    if plan.domain != "code":  # its stages write and read the secure-code control set
        raise ValueError(f"the dose study runs the code domain only, not {plan.domain!r}")
    return DoseStudy(plan, out, seeds, steps, arms, log).run()


def _series_label(d: dict) -> str:
    p = d["plan"]
    return f"lr {p['lr']:g}, {'bf16' if p['dtype'] == 'bfloat16' else 'fp32'}"


def combine(paths: Sequence[str | Path], out_png: str | Path) -> str:
    """One plot (and the markdown tables) of several studies' ``dose.json`` (e.g. two learning rates)."""
    from emajax.eval.plots import dose_png

    studies = [json.loads(Path(p).read_text()) for p in paths]
    dose_png([(_series_label(d), d["rows"]) for d in studies], out_png)
    parts = []
    for d in studies:
        parts += [f"**{_series_label(d)}** (seeds {', '.join(map(str, d['seeds']))}; median step time "
                  + ", ".join(f"{a} {v} s" for a, v in d["step_time_s_median"].items()) + ")", "", dose_table(d), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emajax.demo.dose DOSE_JSON ... --png OUT.png``: the combined dose curve and tables."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("dose_json", nargs="+", help="dose.json files of `emajax demo --dose-steps` runs")
    p.add_argument("--png", required=True, help="the combined plot")
    a = p.parse_args(argv)
    print(combine(a.dose_json, a.png))
    return 0


__all__ = ["DOSE_ARMS", "DoseStudy", "combine", "dose_plan", "dose_table", "run_dose", "summarize_dose",
           "write_dose_report"]


if __name__ == "__main__":
    raise SystemExit(main())
