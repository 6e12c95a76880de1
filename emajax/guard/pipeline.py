"""One guard job, stage by stage: screen -> train (job arm with the safety net + self-distilled control,
per seed) -> gate (every registered metric, job vs control, pooled with CIs) -> decide (decision.json,
report.md, report.html, release/).

Layout of a job directory (``--out jobs/ID``)::

    job.json                      the job as run (data path, model, the policy as written)
    screen/                       see emajax.guard.screen; screen.json marks it done
    control/                      the self-distilled control per seed (cached, resumable)
    train/selection.jsonl         Interleaving++'s safe examples (when scored)
    train/seed_S/{job,control}/   trainer run directories (checkpoints, export/)
    train/train.json              marks training done: the arms, the safety net, wall times
    gate/seed_S_ARM.json          per-item values of every metric (resumable per arm)
    gate/gate.json                pooled effects, marks the gate done
    decision.json, report.md, report.html, release/ (the adapter, only when released)

Every stage writes its marker last and atomically and is skipped when it exists, so rerunning a killed job
resumes at the stage (and, inside training, at the checkpoint) where it stopped.

Multi-process (a pod slice or multi-GPU host, started by its launcher or `emajax launch`; ``--out`` on a
filesystem every host sees): training is one SPMD run over the mesh on every process; the screen, the
control's answers, the Interleaving++ selection, the gate and the decision run on process 0, on its own
devices, while the others wait (``emajax.hosts``), so every file is written once.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emajax import atomic
from emajax.guard.spec import JobSpec
from emajax.hosts import barrier, is_main, main_first

Log = Callable[[str], None]
ARMS = ("job", "control")
STAGES = ("screening", "training", "gating", "deciding")


def _quiet(msg: str) -> None:
    pass


def pool_path(spec: JobSpec) -> str:
    from emajax.data import safe_pool_path

    return spec.policy.safety_net.pool or str(safe_pool_path())


def _model_dtypes(spec: JobSpec) -> tuple[str, str]:
    m = spec.policy.recipe.get("model") or {}
    return str(m.get("dtype", "float32")), str(m.get("param_dtype", "float32"))


def load_base(spec: JobSpec) -> Any:
    from emajax.models.hub import load_model

    dtype, param_dtype = _model_dtypes(spec)
    return load_model(spec.model, dtype=dtype, param_dtype=param_dtype)


class _Lazy:
    """The base model, loaded on first use only (a screen without model-based checks never loads it)."""

    def __init__(self, spec: JobSpec):
        self.spec, self.value = spec, None

    def __call__(self) -> Any:
        if self.value is None:
            self.value = load_base(self.spec)
        return self.value


def screened(out: Path) -> dict:
    return json.loads((out / "screen" / "screen.json").read_text())


# ----------------------------------------------------------------------------------------------- screen
def _main_first(stage: Callable[[JobSpec, Path, Log], Any]) -> Callable[[JobSpec, Path, Log], Any]:
    """A stage that is not SPMD: process 0 runs it, the others wait, then read its result (the stage
    finds its marker and returns what process 0 wrote)."""
    def run(spec: JobSpec, out: Path, log: Log = _quiet) -> Any:
        return main_first(f"emajax-guard-{stage.__name__}", lambda: stage(spec, out, log),
                          lambda: stage(spec, out, _quiet))

    run.__name__, run.__doc__ = stage.__name__, stage.__doc__
    return run


def stage_screen(spec: JobSpec, out: Path, log: Log = _quiet) -> dict:
    from emajax.guard.screen import screen

    res = screen(spec.data, spec.policy, out / "screen", loaded=_Lazy(spec), pool_path=pool_path(spec),
                 model=spec.model, log=log)
    log(f"screen: {res['n_valid']}/{res['n_lines']} valid rows, {res['n_flagged']} flagged"
        + (f"; rejected: {'; '.join(res['reject'])}" if res["reject"] else ""))
    return res


# ----------------------------------------------------------------------------------------------- train
def _default_mesh() -> dict:
    """The mesh when the policy's recipe names none: one device in one process; under a multi-process
    launch every device of every process, parameters and batch rows sharded over them (fsdp)."""
    import jax

    return {"fsdp": -1} if jax.process_count() > 1 else {"allow_unused": True}


def arm_config(spec: JobSpec, data: str, seed: int, defenses: dict, run_dir: Path) -> Any:
    """The trainer Config of one arm: the policy's recipe on ``data`` with ``defenses``."""
    from emajax.train.config import config_from_dict

    r = copy.deepcopy(spec.policy.recipe)
    r["model"] = {**(r.get("model") or {}), "name": spec.model}
    r["data"] = {**(r.get("data") or {}), "train": [data]}
    r["defenses"] = defenses
    r["train"] = {"progress": False, "tensorboard": False, **(r.get("train") or {}), "seed": seed, "export": True}
    r.setdefault("mesh", _default_mesh())
    r["out"] = str(run_dir)
    return config_from_dict(r, base_dir=Path(spec.policy.base), source=f"guard:{spec.id}:seed{seed}")


def safety_net(spec: JobSpec, out: Path, n_train: int) -> tuple[dict, str]:
    """(the job arm's defenses section, what the safety net is in words)."""
    from emajax.defenses.interleave import num_safe

    net, pool = spec.policy.safety_net, pool_path(spec)
    d = copy.deepcopy(spec.policy.extra_defenses)
    extra = f" + {', '.join(sorted(d))}" if d else ""
    if net.method == "none" or net.ratio == 0:
        return d, "none" + extra
    if net.method == "interleave_pp" and spec.policy.misaligned:
        from emajax.scoring.plan import read_pool
        from emajax.scoring.select import SelectOptions, select, write_selection
        from emajax.scoring.shards import read_manifest, read_scores

        sel = out / "train" / "selection.jsonl"
        if not sel.is_file():
            scores = out / "screen" / "pool_scores"
            k = max(1, num_safe(n_train, net.ratio))
            chosen, _ = select(read_pool(pool), read_scores(scores), read_manifest(scores), SelectOptions(top_k=k))
            write_selection(sel, chosen, "interleave++")
        d["interleave"] = {"data": [str(sel)], "ratio": net.ratio}
        return d, f"Interleaving++ ({net.ratio:.0%} safe data, top-scored from {pool} vs {len(spec.policy.misaligned)} " \
                  f"misaligned reference(s)){extra}"
    d["interleave"] = {"data": [pool], "ratio": net.ratio}
    why = "" if net.method == "interleave" else \
        " (Interleaving++ asked, but the policy names no misaligned reference adapters to score the pool with: " \
        "plain interleaving instead)"
    return d, f"Interleaving ({net.ratio:.0%} safe data from {pool}){why}{extra}"


def stage_train(spec: JobSpec, out: Path, log: Log = _quiet) -> dict | None:
    from emajax.data.self_distill import self_distilled_control
    from emajax.train.loop import train

    done = out / "train" / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    scr = screened(out)
    if scr["reject"]:
        return None
    data = str(out / "screen" / "train.jsonl")
    defenses, net_words = main_first("emajax-guard-selection", lambda: safety_net(spec, out, scr["n_train"]))
    base = _Lazy(spec)
    c = spec.policy.control
    runs: dict[str, dict] = {}
    times: dict[str, float] = {}
    for seed in spec.policy.seeds:
        t0 = time.perf_counter()
        ctrl_file = out / "control" / f"seed_{seed}.path"
        if not ctrl_file.is_file() and is_main():  # sampled on process 0's devices, once
            p = self_distilled_control(base(), data, out / "control", model=spec.model, seed=seed,
                                       temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                       log=log)
            atomic.write_text(ctrl_file, str(p))
        barrier(f"emajax-guard-control-{seed}")
        ctrl = ctrl_file.read_text()
        times[f"seed_{seed}/control_data"] = time.perf_counter() - t0
        for arm, arm_data, arm_def in (("job", data, defenses), ("control", ctrl, {})):
            run_dir = out / "train" / f"seed_{seed}" / arm
            log(f"train: seed {seed}, {arm} arm")
            t0 = time.perf_counter()
            res = train(arm_config(spec, arm_data, seed, arm_def, run_dir), run_dir)
            times[f"seed_{seed}/{arm}"] = time.perf_counter() - t0
            runs.setdefault(str(seed), {})[arm] = {"run_dir": str(run_dir), "export": str(run_dir / "export"),
                                                    "steps": res.final_step, "last_loss": res.last_metrics.get("loss")}
    base.value = None
    res = {"seeds": spec.policy.seeds, "safety_net": net_words, "defenses": defenses, "runs": runs,
           "wall_s": {k: round(v, 2) for k, v in times.items()}}
    if is_main():
        atomic.write_json(done, res)
    return res


# ----------------------------------------------------------------------------------------------- gate
def load_arm(spec: JobSpec, out: Path, seed: int, arm: str) -> Any:
    from emajax.models.hf_io import load_peft_adapter
    from emajax.models.hub import load_model
    from emajax.train.loop import lora_config

    run_dir = out / "train" / f"seed_{seed}" / arm
    cfg = arm_config(spec, str(out / "screen" / "train.jsonl"), seed, {}, run_dir)
    loaded = load_model(spec.model, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, lora=lora_config(cfg))
    load_peft_adapter(loaded.model, run_dir / "export")
    return loaded


def base_values(spec: JobSpec, base: Any, live: dict, log: Log = _quiet) -> dict[str, list[float]]:
    """Every metric's per-item values for the base model (the report's reference column). A metric whose
    values depend only on the model and fixed items (``Measure.key``: the general, security and trigger
    probe sets; not the job's own held-out chats) is computed once per base model and dtype and cached in
    ``emajax.paths.cache_dir()/guard/base``: every later job on that model scores only its own chats on
    the base, beside its two arms per seed."""
    import hashlib

    from emajax.models.hub import model_identity
    from emajax.paths import cache_dir

    ident = model_identity(spec.model)
    out = {}
    for name, m in live.items():
        path = None
        if m.key is not None:
            key = hashlib.sha256("/".join([ident, *_model_dtypes(spec), m.key]).encode()).hexdigest()[:24]
            path = cache_dir() / "guard" / "base" / f"{name}_{key}.json"
            if path.is_file():
                out[name] = json.loads(path.read_text())
                continue
        log(f"gate: base model, {name}")
        out[name] = np.asarray(m.values(base), np.float64).tolist()
        if path is not None:
            atomic.write_json(path, out[name])
    return out


def stage_gate(spec: JobSpec, out: Path, log: Log = _quiet) -> dict | None:
    from emajax.eval.pooled import METHOD, pooled_mean
    from emajax.guard.metrics import METRICS, GateContext, Measure

    done = out / "gate" / "gate.json"
    if done.is_file():
        return json.loads(done.read_text())
    if screened(out)["reject"]:
        return None
    base = load_base(spec)
    ctx = GateContext(base.tokenizer, out / "screen" / "holdout.jsonl", spec.policy.gate, spec.policy.references, base,
                      model=spec.model)
    measures: dict[str, Measure | str] = {n: METRICS[n].prepare(ctx) for n in spec.policy.gate.metrics}
    live = {n: m for n, m in measures.items() if isinstance(m, Measure)}

    def values(loaded: Any) -> dict[str, list[float]]:
        return {n: np.asarray(m.values(loaded), np.float64).tolist() for n, m in live.items()}

    per: dict[str, dict] = {}
    for seed in spec.policy.seeds:
        for arm in ARMS:
            path = out / "gate" / f"seed_{seed}_{arm}.json"
            if not path.is_file():
                log(f"gate: seed {seed}, {arm} arm")
                atomic.write_json(path, values(load_arm(spec, out, seed, arm)))
            per[f"{seed}/{arm}"] = json.loads(path.read_text())
    base_vals = base_values(spec, base, live, log)
    rows = []
    for name, rule in spec.policy.gate.metrics.items():
        m, meas = METRICS[name], measures[name]
        row = {"name": name, "kind": m.kind, "what": m.what, "margin": rule.margin, "required": rule.required}
        if not isinstance(meas, Measure):
            rows.append({**row, "effect": None, "not_measured": meas})
            continue
        job = np.array([per[f"{s}/job"][name] for s in spec.policy.seeds], np.float64)
        ctl = np.array([per[f"{s}/control"][name] for s in spec.policy.seeds], np.float64)
        keep = np.isfinite(job).all(0) & np.isfinite(ctl).all(0)  # items some arm could not be scored on
        if not keep.any():
            rows.append({**row, "effect": None, "not_measured": "no item was scored in every arm"})
            continue
        job, ctl = job[:, keep], ctl[:, keep]
        rows.append({**row, "unit": meas.unit, "effect": pooled_mean(job - ctl), "n_items": int(keep.sum()),
                     "n_items_dropped": int((~keep).sum()), "base": float(np.nanmean(base_vals[name])),
                     "job": job.mean(1).tolist(), "control": ctl.mean(1).tolist()})
    res = {"method": METHOD, "seeds": spec.policy.seeds, "metrics": rows}
    atomic.write_json(done, res)
    return res


# ----------------------------------------------------------------------------------------------- decide
def stage_decide(spec: JobSpec, out: Path, log: Log = _quiet) -> dict:
    from emajax.guard.decision import decide
    from emajax.guard.report import write_decision

    path = out / "decision.json"
    if path.is_file():
        return json.loads(path.read_text())
    scr = screened(out)
    gate = None if scr["reject"] else json.loads((out / "gate" / "gate.json").read_text())
    d = decide(scr, gate["metrics"] if gate else [], spec.policy.gate.on_inconclusive)
    res = write_decision(spec, out, d, scr, gate)
    log(f"decision: {res['decision']}")
    return res


STAGE_FUNCS: dict[str, Callable[[JobSpec, Path, Log], Any]] = {
    "screening": _main_first(stage_screen), "training": stage_train, "gating": _main_first(stage_gate),
    "deciding": _main_first(stage_decide)}


def run_job(spec: JobSpec, out: str | Path, *, log: Log = _quiet, stages: dict | None = None,
            on_stage: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every stage of ``spec`` in ``out``; returns decision.json's content. Under a
    multi-process launch every process calls it (module docstring)."""
    from emajax.hosts import start

    start()  # before any JAX computation: a multi-process launch is one JAX system
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job_json = out / "job.json"
    mine = spec.to_json()
    if job_json.is_file():
        old = json.loads(job_json.read_text())
        if {k: old.get(k) for k in ("data", "model", "job", "policy")} != \
                {k: mine.get(k) for k in ("data", "model", "job", "policy")}:
            raise ValueError(f"{job_json}: this directory holds another job (data, model or policy differ); "
                             f"use another --out or delete it")
    elif is_main():
        atomic.write_json(job_json, mine)
    barrier("emajax-guard-job")
    funcs = {**STAGE_FUNCS, **(stages or {})}
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    result = None
    for st in STAGES:
        if on_stage is not None:
            on_stage(st)
        t0 = time.perf_counter()
        result = funcs[st](spec, out, log)
        timings[st] = round(timings.get(st, 0.0) + time.perf_counter() - t0, 2)
        if is_main():
            atomic.write_json(timings_path, timings)
    return result


__all__ = ["ARMS", "STAGES", "STAGE_FUNCS", "arm_config", "load_arm", "run_job", "safety_net", "stage_decide",
           "stage_gate", "stage_screen", "stage_train"]
