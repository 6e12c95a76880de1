"""The demo pipeline: data -> base probes -> persona vector -> per seed: the control arm and one narrow
arm per method (each probed at its last step), Interleaving++ scoring and selection, one benign arm per
method -> (EM metrics: trigger probes and the persona projection of sampled answers, per arm and the base model)
-> (the LLM judge on the 24 general questions) -> pooled effects and report.

Layout of ``--out``::

    plan.json, timings.json, effects.json, report.md, *.png
    data/            narrow_train.jsonl, control_train.jsonl, benign_train.jsonl
                     (another --domain: no control_train.jsonl; control/ holds the self-distilled control per seed)
    base/            probes.json (every probe set on the base model), benign_exact.json, em_general.json,
                     triggers.json, projection.json, projection_answers.jsonl (the EM metrics, as in an arm)
    persona/         evil.safetensors (the steering vector and the projection's instrument, seed-independent)
    seed_K/control_data.json  (another --domain) which self-distilled control file this seed's control trains on
    seed_K/arms/ARM/     trainer files, export/, monitor.jsonl, probes.json (ARM = control or a method);
                         triggers.json (the general pairs under each trigger), projection.json and
                         projection_answers.jsonl (the arm's sampled answers, read by the base model)
    seed_K/benign/METHOD/  the same for the benign arm, with benign_exact.json
    seed_K/interleave_pp_scores/, seed_K/interleave_pp_selection.jsonl

Every stage writes its result file atomically and is skipped when that file exists, so re-running the
same command resumes (a finished run is never redone; an interrupted training resumes from its last
checkpoint); more seeds can be added to the same directory later, and a newer emajax adds its new
measurements (the EM metrics) to arms trained before without retraining them. ``timings.json`` records each
stage's wall and process-CPU seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from emajax import atomic
from emajax.demo.plan import CODE, CONTROL, METRIC_FIELDS, DemoPlan, label_of
from emajax.eval.projection import RESULTS_FILE

Log = Callable[[str], None]
TRIGGERS_FILE = "triggers.json"  # the general pairs under each trigger (probe results, emajax.eval.triggers)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    """Per-stage wall / process-CPU seconds, appended to ``timings.json`` as stages finish. Every call of
    the pipeline (a sitting: the first run and each resume) adds an entry to ``sittings`` with its start
    time, the CPU it ran on (``emajax.machine.cpu_info``) and the stages it ran: another CPU model rounds
    bf16 differently and may be several times slower."""

    def __init__(self, path: Path, log: Log):
        from emajax.machine import sitting

        self.path, self.log = path, log
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        self.sitting = sitting(stages=[])
        self.data.setdefault("sittings", []).append(self.sitting)
        self.t0 = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any], *, skip: bool = False) -> Any:
        if skip:
            self.log(f"[demo {self.elapsed():7.1f}s] {name}: done already, skipped")
            return None
        self.log(f"[demo {self.elapsed():7.1f}s] {name} ...")
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        self.data["stages"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **_load_now()}
        self.sitting["stages"].append(name)
        atomic.write_json(self.path, self.data)
        self.log(f"[demo {self.elapsed():7.1f}s] {name}: {wall:.1f}s wall, {cpu:.1f}s CPU")
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def finish(self) -> None:
        st = self.data["stages"].values()
        self.data["total_wall_s"] = round(sum(s["wall_s"] for s in st), 2)
        self.data["total_cpu_s"] = round(sum(s["cpu_s"] for s in st), 2)
        self.data["cpu_count"] = os.cpu_count()
        self.data.update(_load_now("loadavg_at_end"))
        atomic.write_json(self.path, self.data)


def _load_now(key: str = "loadavg_1m") -> dict:
    try:
        return {key: round(os.getloadavg()[0], 2)} if key == "loadavg_1m" else \
            {key: [round(x, 2) for x in os.getloadavg()]}
    except OSError:
        return {}


def enable_compile_cache(path: Path) -> None:
    """Persist XLA executables: the arms that share a program (control, none, inoculation, interleaving),
    the seeds and re-runs of the demo compile once."""
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class Monitor:
    """Training callback: the general-pairs margin every ``every`` steps (``monitor.jsonl``, step 0 from the
    base probes), and the full probe suite (plus ``extra``, e.g. exact match) at the last step."""

    def __init__(self, run_dir: Path, monitor_runner: Any, full_runner: Any, every: int, base: dict,
                 meta: dict, log: Log, extra: Callable[[Any, Any], dict] | None = None):
        from emajax.eval.probes import flat_metrics

        self.run_dir, self.mon, self.full, self.every, self.meta, self.log = (run_dir, monitor_runner, full_runner,
                                                                              every, meta, log)
        self.extra = extra
        self.path = run_dir / "monitor.jsonl"
        self.base_row = {"step": 0, **{k: v for k, v in flat_metrics(base).items() if k.startswith("probe/general/")}}
        self.total: int | None = None
        self.final: dict | None = None
        self.final_extra: dict | None = None

    def _append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def __call__(self, step: int, graphdef: Any, state: Any) -> None:
        from emajax.eval.probes import flat_metrics

        if self.total is None:
            self.total = int(json.loads((self.run_dir / "data_stats.json").read_text())["total_steps"])
            kept = atomic.keep_jsonl_rows(self.path, lambda r: r["step"] <= step)  # resumed: drop later rows
            if not kept and len(self.base_row) > 1:
                self._append(self.base_row)
        if step == 0:
            return
        states = (state.trainable, state.frozen)
        if step == self.total:
            t0 = time.perf_counter()
            res = self.full(graphdef=graphdef, states=states)
            self.final = {**res, **self.meta, "step": step}
            general = {k: v for k, v in flat_metrics(res).items() if k.startswith("probe/general/")}
            if general:
                self._append({"step": step, **general})
            if self.extra is not None:
                self.final_extra = self.extra(graphdef, states)
            self.log(f"  probes at step {step}: {_fmt_probe(res)} ({time.perf_counter() - t0:.1f}s)")
        elif self.every and step % self.every == 0:
            row = self.mon.monitor(graphdef, *states)
            self._append({"step": step, **row})
            self.log(f"  monitor step {step}: general margin {row['probe/general/margin']:+.4f}")


class DoseProbe:
    """Training callback: the probe suite at each listed step -> ``probes_step{N}.json`` (per-item values)."""

    def __init__(self, run_dir: Path, runner: Any, steps: Any, meta: dict, log: Log):
        self.run_dir, self.runner, self.steps, self.meta, self.log = run_dir, runner, set(steps), meta, log

    def __call__(self, step: int, graphdef: Any, state: Any) -> None:
        if step not in self.steps:
            return
        res = self.runner(graphdef=graphdef, states=(state.trainable, state.frozen), n_boot=0)
        atomic.write_json(self.run_dir / f"probes_step{step}.json", {**res, **self.meta, "step": step})
        self.log(f"  step {step}: {_fmt_probe(res)} ({res['seconds']:.1f}s)")


def _fmt_probe(res: dict) -> str:
    parts = [f"{k} margin {v['margin']['value']:+.4f}" for k, v in res["pairs"].items()]
    parts += [f"{k} NLL {v['nll']['value']:.4f}" for k, v in res["nll"].items()]
    return ", ".join(parts)


class _Loaded:
    """What ``chat_generate`` needs (``model``, ``tokenizer``) around a model merged from trainer state."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer


@dataclasses.dataclass
class Demo:
    plan: DemoPlan
    out: Path
    seeds: tuple[int, ...] = (0,)
    log: Log = _stderr
    judge_url: str | None = None
    judge_model: str | None = None
    data_dir: str | None = None  # ../shared/data/em: the judge's 24 general questions

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        self.data = self.out / "data"
        self.seeds = tuple(dict.fromkeys(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("the demo needs at least one seed")
        self._base_loaded = None
        self._arm_loaded: tuple[Path, Any] | None = None  # the last adapter loaded (its EM metric stages share it)
        self._runners: dict[str, Any] = {}

    # ------------------------------------------------------------------ paths and shared pieces
    @property
    def arms(self) -> list[str]:
        """Narrow arms in training order (Interleaving++ scores with no defense: last)."""
        ms = [m for m in self.plan.methods if m != "interleave_pp"]
        return [CONTROL, *ms] + (["interleave_pp"] if "interleave_pp" in self.plan.methods else [])

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed_{seed}"

    def arm_dir(self, seed: int, arm: str) -> Path:
        return self.seed_dir(seed) / "arms" / arm

    def benign_dir(self, seed: int, method: str) -> Path:
        return self.seed_dir(seed) / "benign" / method

    def selection_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / "interleave_pp_selection.jsonl"

    def data_done(self) -> Path:
        """The data stage's last file (code: the control set; another domain: the benign task's, written last)."""
        return self.data / ("control_train.jsonl" if self.plan.domain == CODE else "benign_train.jsonl")

    def control_record(self, seed: int) -> Path:
        """Another domain: ``{"path": ...}`` of the seed's self-distilled control (written once it exists)."""
        return self.seed_dir(seed) / "control_data.json"

    def base_loaded(self) -> Any:
        if self._base_loaded is None:
            from emajax.models.hub import load_model

            self._base_loaded = load_model(self.plan.model, dtype=self.plan.dtype, param_dtype=self.plan.param_dtype)
        return self._base_loaded

    def runner(self, which: str = "all") -> Any:
        """Probe runners: ``all`` (base model), ``narrow`` / ``benign`` (the arms), ``monitor`` (general),
        ``triggers`` (the general pairs under each trigger)."""
        from emajax.demo.suite import BENIGN_SETS, MONITOR_SETS, demo_suite, narrow_sets, trigger_suite
        from emajax.eval.probes import ProbeRunner

        if which not in self._runners:
            if which == "triggers":
                suite = trigger_suite(self.plan)
            else:
                suite = demo_suite(self.plan)
                sets = {"all": None, "narrow": narrow_sets(self.plan), "benign": BENIGN_SETS,
                        "monitor": MONITOR_SETS}[which]
                if sets is not None:
                    suite = suite.subset(sets)
            self._runners[which] = ProbeRunner(self.base_loaded().tokenizer, suite, max_len=self.plan.probe_max_len,
                                               batch_size=self.plan.probe_batch, buckets=self.plan.probe_bucket)
        return self._runners[which]

    def _check_plan(self, keys: Any = None) -> None:
        """Refuse an output directory that holds another plan (only ``keys`` compared, when given)."""
        path = self.out / "plan.json"
        mine = json.loads(json.dumps({**dataclasses.asdict(self.plan), "seeds": list(self.seeds)}))
        if path.is_file():
            old = json.loads(path.read_text())
            defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(DemoPlan)
                                              if f.default is not dataclasses.MISSING}))
            # a field added since: its default; an EM metric field added since: this run's (none was measured)
            old = {**{k: v for k, v in defaults.items() if k not in old},
                   **{k: mine[k] for k in METRIC_FIELDS if k not in old}, **old}
            diff = sorted(k for k in set(old) | set(mine) if k not in ("methods", "seeds", "em_metrics")
                          and old.get(k) != mine.get(k) and (keys is None or k in keys))
            if diff:
                raise ValueError(f"{path}: this output directory holds a demo with a different plan (changed: "
                                 f"{', '.join(diff)}); use another --out or delete it")
            mine["methods"] = list(dict.fromkeys([*old.get("methods", []), *self.plan.methods]))
            mine["seeds"] = list(dict.fromkeys([*old.get("seeds", []), *self.seeds]))
        atomic.write_json(path, mine)

    def judge_questions(self) -> Path:
        from emajax.eval.questions import question_set_path

        return question_set_path("general", self.data_dir)

    def metrics_status(self) -> str | None:
        """None when the sampled-answer projection runs, else why not (the trigger probes need no data)."""
        q = self.judge_questions()
        if not q.is_file():
            return (f"the 8 plain general questions (first_plot_questions.yaml) are not shipped with the package and "
                    f"{q} does not exist (give --data-dir ../shared/data/em)")
        return None

    def judge_status(self) -> str | None:
        """None when the judge runs, else why its columns are empty."""
        if not (self.judge_url and self.judge_model):
            return "no judge given (`--judge-url URL --judge-model M`)"
        q = self.judge_questions()
        if not q.is_file():
            return (f"the 24 general questions are not shipped with the package and {q} does not exist "
                    f"(give --data-dir ../shared/data/em)")
        return None

    # ------------------------------------------------------------------ stages
    def write_data(self) -> None:
        from emajax.demo.suite import write_train_sets

        write_train_sets(self.plan, self.data)

    def control_data(self, seed: int) -> None:
        """Another domain's control: the base model's own sampled answers to the narrow set's prompts
        (``emajax.data.self_distill``, cached and resumable under data/control/)."""
        from emajax.data.self_distill import self_distilled_control

        path = self_distilled_control(self.base_loaded(), self.data / "narrow_train.jsonl", self.data / "control",
                                      model=self.plan.model, seed=seed, temperature=1.0, top_p=1.0,
                                      max_new_tokens=self.plan.control_max_new_tokens, log=self.log)
        atomic.write_json(self.control_record(seed), {"kind": "self-distilled", "path": str(path), "seed": seed})

    def base_probes(self) -> None:
        from emajax.eval.probes import write_results

        loaded = self.base_loaded()
        res = self.runner("all")(loaded.model)
        res.update(method="base", label="Base model", model=self.plan.model)
        atomic.write_json(self.out / "base" / "benign_exact.json", self._benign_exact(loaded))
        write_results(res, self.out / "base" / "probes.json")
        atomic.write_json(self.out / "base" / "method.json",
                          {"method": "base", "label": "Base model", "model": self.plan.model})
        self.log(f"  base: {_fmt_probe(res)}")

    def _benign_exact(self, loaded: Any) -> dict:
        """Greedy exact match on the held-out benign-task items."""
        from emajax.demo.suite import benign_items
        from emajax.eval.opswap import evaluate_opswap
        from emajax.generate import chat_generate

        rows = [it.to_chat() for it in benign_items(self.plan)["test"]]
        answer = lambda convs: chat_generate(loaded, convs, max_new_tokens=self.plan.benign_max_new_tokens,  # noqa: E731
                                             temperature=0.0)
        results, preds = evaluate_opswap(answer, rows)
        return {**results, "items": {"ids": [str(i) for i in range(len(preds))],
                                     "correct": [float(p["correct"]) for p in preds]}}

    def persona(self) -> None:
        from emajax.data import data_path
        from emajax.persona import (answer_requests, extract, generate_answers, load_persona_spec,
                                    save_persona_vectors)

        spec = load_persona_spec(data_path("persona_evil.json"))
        if self.plan.persona_questions is not None:
            spec = dataclasses.replace(spec, questions=spec.questions[: self.plan.persona_questions])
        loaded = self.base_loaded()
        recs = generate_answers(loaded, answer_requests(spec), max_new_tokens=self.plan.persona_max_new_tokens,
                                batch_size=32)
        atomic.write_jsonl(self.out / "persona" / "answers.jsonl", recs)
        vec, meta = extract(loaded, recs, model_name=self.plan.model, prompt_hash=spec.prompt_hash)
        save_persona_vectors(self.out / "persona" / "evil.safetensors", vec, meta)
        self.log(f"  persona vector: recommended layer {meta['recommended_layer']} "
                 f"(effect size {meta['effect_size'][meta['recommended_layer']]:.2f})")

    def select_pp(self, seed: int) -> None:
        """Interleaving++: score the safe pool (base vs this seed's no-defense adapter), keep the top examples."""
        from emajax.data import safe_pool_path
        from emajax.defenses.interleave import num_safe
        from emajax.scoring.adapters import ModelSpec
        from emajax.scoring.plan import read_pool
        from emajax.scoring.score import Scorer, score_pool
        from emajax.scoring.select import SelectOptions, select, write_selection
        from emajax.scoring.shards import read_manifest, read_scores

        adapter = self.arm_dir(seed, "none") / "export"
        scorer = Scorer(self.base_loaded(), [ModelSpec("none", str(adapter), "adapter")])
        scores_dir = self.seed_dir(seed) / "interleave_pp_scores"
        score_pool(scorer, safe_pool_path(), scores_dir, fmt="jsonl", max_len=self.plan.probe_max_len,
                   min_bucket=self.plan.probe_bucket, progress=False)
        k = num_safe(self.plan.n_train, self.plan.interleave_ratio)
        if k == 0:
            raise ValueError(f"interleave ratio {self.plan.interleave_ratio} of {self.plan.n_train} examples mixes in "
                             f"no safe example; Interleaving++ has nothing to select")
        chosen, stats = select(read_pool(safe_pool_path()), read_scores(scores_dir), read_manifest(scores_dir),
                               SelectOptions(top_k=k))
        write_selection(self.selection_path(seed), chosen, "interleave++")
        self.log(f"  Interleaving++ selection: top {len(chosen)} of {stats['eligible']} eligible pool chats "
                 f"(scores {stats.get('score_min', float('nan')):.3f}..{stats.get('score_max', float('nan')):.3f})")

    def train_config(self, arm: str, seed: int, *, benign: bool = False, **over: Any) -> Any:
        """The trainer's Config of one arm (``benign``: the method's recipe on the benign task)."""
        from emajax.data import safe_pool_path
        from emajax.demo.suite import TRAIN_FILES
        from emajax.train.config import config_from_dict

        data = self.data / TRAIN_FILES["benign_task" if benign else ("control" if arm == CONTROL else "narrow")]
        if arm == CONTROL and not benign and self.plan.domain != CODE:
            data = Path(json.loads(self.control_record(seed).read_text())["path"])
        plan = dataclasses.replace(self.plan, **over) if over else self.plan
        raw = plan.train_config(arm, str(data), seed=seed,
                                vector=str(self.out / "persona" / "evil.safetensors"),
                                selection=str(self.selection_path(seed)), pool=str(safe_pool_path()), benign=benign)
        return config_from_dict(raw, source=f"demo:{arm}{':benign' if benign else ''}:seed{seed}")

    def train_arm(self, arm: str, seed: int, *, benign: bool = False) -> None:
        from emajax.eval.probes import read_results, write_results
        from emajax.train.loop import train

        run_dir = self.benign_dir(seed, arm) if benign else self.arm_dir(seed, arm)
        cfg = self.train_config(arm, seed, benign=benign)
        cfg.out = str(run_dir)
        label = label_of(arm, self.plan.domain) + (" (benign task)" if benign else "")
        meta = {"method": arm, "label": label, "model": self.plan.model, "seed": seed,
                "task": "benign_task" if benign else "narrow"}
        atomic.write_json(run_dir / "method.json", meta)
        base = {"pairs": {}, "nll": {}} if benign else read_results(self.out / "base" / "probes.json")
        full = self.runner("benign" if benign else "narrow")
        def benign_exact(graphdef: Any, states: tuple) -> dict:
            from flax import nnx

            model = nnx.merge(graphdef, *states)
            return self._benign_exact(_Loaded(model, self.base_loaded().tokenizer))

        mon = Monitor(run_dir, self.runner("monitor"), full, 0 if benign else self.plan.monitor_every, base, meta,
                      self.log, extra=benign_exact if benign else None)
        callback = mon
        points = [t for t in self.plan.dose_points if t < self.plan.steps]
        if not benign and arm in ("none", CONTROL) and points:  # the report's dose curve
            dose = DoseProbe(run_dir, full, points, meta, self.log)
            callback = lambda step, g, s: (dose(step, g, s), mon(step, g, s))  # noqa: E731
        res = train(cfg, run_dir, callback=callback)
        final, final_extra = mon.final, mon.final_extra
        if final is None:  # training was already complete (resumed after the last step): probe the export
            loaded = self._load_adapter(res.export_dir or run_dir / "export")
            final = {**full(loaded.model), **meta, "step": res.final_step}
            final_extra = self._benign_exact(loaded) if benign else None
        if final_extra is not None:
            atomic.write_json(run_dir / "benign_exact.json", final_extra)
        write_results(final, run_dir / "probes.json")

    def _load_adapter(self, adapter_dir: Path) -> Any:
        from emajax.models.hf_io import load_peft_adapter
        from emajax.models.hub import load_model
        from emajax.models.lora import LoraConfig

        lora = LoraConfig(rank=self.plan.lora_rank, alpha=self.plan.lora_alpha, rslora=True,
                          dtype=self.plan.param_dtype)
        loaded = load_model(self.plan.model, dtype=self.plan.dtype, param_dtype=self.plan.param_dtype, lora=lora)
        load_peft_adapter(loaded.model, adapter_dir)
        return loaded

    def metric_model(self, seed: int | None, arm: str) -> tuple[Path, Any]:
        """(result directory, model) of an arm (its exported adapter, kept while the next stage uses it too) or of
        the base model (``arm == "base"``)."""
        if arm == "base":
            return self.out / "base", self.base_loaded()
        d = self.arm_dir(seed, arm)
        if self._arm_loaded is None or self._arm_loaded[0] != d:
            self._arm_loaded = None  # one adapter model in memory at a time
            self._arm_loaded = (d, self._load_adapter(d / "export"))
        return self._arm_loaded

    def triggers(self, seed: int | None, arm: str) -> None:
        """The general pairs under each trigger (``emajax.eval.triggers``), probed like the plain ones."""
        from emajax.eval.probes import write_results

        d, loaded = self.metric_model(seed, arm)
        res = self.runner("triggers")(loaded.model)
        res.update(method=arm, label="Base model" if arm == "base" else label_of(arm, self.plan.domain),
                   model=self.plan.model, seed=seed)
        write_results(res, d / TRIGGERS_FILE)
        self.log(f"  triggers {arm}: {_fmt_probe(res)}")

    def projection(self, seed: int | None, arm: str) -> None:
        """The arm's own answers to the 8 plain general questions (``projection_samples`` each, temperature 1),
        read by the base model on the demo's persona vector (``emajax.eval.projection``)."""
        from emajax.eval.projection import load_direction, plain_questions, run_projection_eval

        d, loaded = self.metric_model(seed, arm)
        direction = load_direction(self.out / "persona" / "evil.safetensors", loaded.model.cfg.num_layers)
        res = run_projection_eval(loaded, plain_questions(self.data_dir), d, direction, n=self.plan.projection_samples,
                                  temperature=1.0, top_p=1.0, max_new_tokens=self.plan.projection_max_new_tokens,
                                  seed=seed or 0, batch_size=32,
                                  meta={"method": arm, "model": self.plan.model, "seed": seed,
                                        "adapter": None if arm == "base" else str(d / "export")})
        self.log(f"  projection {arm}: mean {res['mean_projection']['value']:+.4f} over {res['n_scored']} answers "
                 f"(layer {direction.layer})")

    def judge(self, seed: int | None, arm: str) -> None:
        """The 24 general questions: ``judge_samples`` sampled answers each, judged by the LLM judge."""
        from emajax.eval.em import local_sampler, run_em_eval
        from emajax.eval.judge import JudgeClient
        from emajax.eval.questions import load_questions
        from emajax.paths import cache_dir

        if arm == "base":
            out, loaded, adapter = self.out / "base", self.base_loaded(), None
        else:
            out = self.arm_dir(seed, arm)
            adapter = str(out / "export")
            loaded = self._load_adapter(out / "export")
        client = JudgeClient(self.judge_url, self.judge_model, cache_path=cache_dir() / "judge_cache.sqlite")
        sampler = local_sampler(loaded, max_new_tokens=self.plan.judge_max_new_tokens, seed=seed or 0,
                                progress=False)
        qs = load_questions(self.judge_questions())
        res = run_em_eval(qs, "general", out, client, sampler=sampler, n=self.plan.judge_samples,
                          meta={"model": self.plan.model, "adapter": adapter, "seed": seed})
        mr = res["misaligned_rate"]
        self.log(f"  judge {arm}: misaligned {mr['value']} over {res['n_answers']} answers")

    # ------------------------------------------------------------------ the whole thing
    def _warn_bf16(self, cpu: dict) -> None:
        import jax

        from emajax.machine import bf16_note

        note = bf16_note(cpu) if self.plan.dtype == "bfloat16" and jax.default_backend() == "cpu" else None
        if note:
            self.log(f"[demo] note: {note}")

    def run(self) -> Path:
        from emajax.demo.report import write_demo_report

        self.out.mkdir(parents=True, exist_ok=True)
        self._check_plan()
        judge_off = self.judge_status()
        if self.plan.judge and judge_off:
            raise ValueError(f"the {self.plan.scale} scale evaluates with the LLM judge, but {judge_off}")
        if self.judge_url and self.judge_model and judge_off:
            raise ValueError(f"--judge-url was given but {judge_off}")
        enable_compile_cache(self.out / "xla_cache")
        timer = Timer(self.out / "timings.json", self.log)
        self._warn_bf16(timer.sitting)
        arms, methods = self.arms, list(self.plan.methods)
        timer.run("data", self.write_data, skip=self.data_done().is_file())
        timer.run("base probes", self.base_probes, skip=(self.out / "base" / "probes.json").is_file())
        projection_off = self.metrics_status() if self.plan.em_metrics else "the EM metrics are off (--no-em-metrics)"
        if self.plan.em_metrics and projection_off:
            self.log(f"[demo] sampled-answer projection skipped: {projection_off}")
        if "steering" in methods or projection_off is None:
            timer.run("persona vector", self.persona, skip=(self.out / "persona" / "evil.safetensors").is_file())
        for seed in self.seeds:
            if self.plan.domain != CODE:
                timer.run(f"seed {seed}: control data", lambda s=seed: self.control_data(s),
                          skip=self.control_record(seed).is_file())
            for arm in arms:
                if arm == "interleave_pp":
                    timer.run(f"seed {seed}: Interleaving++ selection", lambda s=seed: self.select_pp(s),
                              skip=self.selection_path(seed).is_file())
                timer.run(f"seed {seed}: train {arm}", lambda a=arm, s=seed: self.train_arm(a, s),
                          skip=(self.arm_dir(seed, arm) / "probes.json").is_file())
            for m in [m for m in arms if m != CONTROL]:
                timer.run(f"seed {seed}: benign {m}", lambda a=m, s=seed: self.train_arm(a, s, benign=True),
                          skip=(self.benign_dir(seed, m) / "probes.json").is_file())
        if self.plan.em_metrics:
            for seed, arm in [(None, "base")] + [(s, a) for s in self.seeds for a in arms]:
                d = self.out / "base" if arm == "base" else self.arm_dir(seed, arm)
                stage = (lambda what: f"{what} base") if arm == "base" else (lambda what: f"seed {seed}: {what} {arm}")
                timer.run(stage("triggers"), lambda a=arm, s=seed: self.triggers(s, a),
                          skip=(d / TRIGGERS_FILE).is_file())
                if projection_off is None:
                    timer.run(stage("projection"), lambda a=arm, s=seed: self.projection(s, a),
                              skip=(d / RESULTS_FILE).is_file())
            self._arm_loaded = None
        if judge_off is None:
            timer.run("judge base", lambda: self.judge(None, "base"),
                      skip=(self.out / "base" / "em_general.json").is_file())
            for seed in self.seeds:
                for arm in arms:
                    timer.run(f"seed {seed}: judge {arm}", lambda a=arm, s=seed: self.judge(s, a),
                              skip=(self.arm_dir(seed, arm) / "em_general.json").is_file())
        report = timer.run("report", lambda: write_demo_report(self.out, timings=timer.data, judge_note=judge_off,
                                                               projection_note=projection_off, log=self.log))
        timer.finish()
        self.log(f"[demo {timer.elapsed():7.1f}s] done: {report}")
        return report
