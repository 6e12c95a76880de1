"""The demo pipeline: data -> base probes -> persona vector -> one training per method (with an EM
monitor) -> Interleaving++ scoring and selection -> final probes (-> the judge at paper scale) -> report.

Every stage writes its result file atomically and is skipped when that file exists, so re-running the
same command resumes (a finished run is never redone; an interrupted training resumes from its last
checkpoint). ``timings.json`` records each stage's wall and process-CPU seconds.
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
from emajax.demo.plan import METHODS, DemoPlan

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    """Per-stage wall / process-CPU seconds, appended to ``timings.json`` as stages finish."""

    def __init__(self, path: Path, log: Log):
        self.path, self.log = path, log
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        self.t0 = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any], *, skip: bool = False) -> Any:
        if skip:
            self.log(f"[demo {self.elapsed():7.1f}s] {name}: done already, skipped")
            return None
        self.log(f"[demo {self.elapsed():7.1f}s] {name} ...")
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        self.data["stages"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
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
        try:
            self.data["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
        atomic.write_json(self.path, self.data)


def enable_compile_cache(path: Path) -> None:
    """Persist XLA executables: the methods that share a program (none, inoculation, interleaving) and
    re-runs of the demo compile once."""
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class Monitor:
    """Training callback: the general-pairs margin every ``every`` steps (``monitor.jsonl``, step 0 from the
    base probes), and the full probe suite at the last step (``probes.json``)."""

    def __init__(self, run_dir: Path, monitor_runner: Any, full_runner: Any, every: int, base: dict,
                 meta: dict, log: Log):
        from emajax.eval.probes import flat_metrics

        self.run_dir, self.mon, self.full, self.every, self.meta, self.log = (run_dir, monitor_runner, full_runner,
                                                                              every, meta, log)
        self.path = run_dir / "monitor.jsonl"
        self.base_row = {"step": 0, **{k: v for k, v in flat_metrics(base).items() if k.startswith("probe/general/")}}
        self.total: int | None = None
        self.final: dict | None = None

    def _append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def __call__(self, step: int, graphdef: Any, state: Any) -> None:
        from emajax.eval.probes import flat_metrics

        if self.total is None:
            self.total = int(json.loads((self.run_dir / "data_stats.json").read_text())["total_steps"])
            kept = atomic.keep_jsonl_rows(self.path, lambda r: r["step"] <= step)  # resumed: drop later rows
            if not kept:
                self._append(self.base_row)
        if step == 0:
            return
        states = (state.trainable, state.frozen)
        if step == self.total:
            t0 = time.perf_counter()
            res = self.full(graphdef=graphdef, states=states)
            self.final = {**res, **self.meta, "step": step}
            general = {k: v for k, v in flat_metrics(res).items() if k.startswith("probe/general/")}
            self._append({"step": step, **general})
            self.log(f"  probes at step {step}: {_fmt_probe(res)} ({time.perf_counter() - t0:.1f}s)")
        elif self.every and step % self.every == 0:
            row = self.mon.monitor(graphdef, *states)
            self._append({"step": step, **row})
            self.log(f"  monitor step {step}: general margin {row['probe/general/margin']:+.4f}")


def _fmt_probe(res: dict) -> str:
    parts = [f"{k} margin {v['margin']['value']:+.4f}" for k, v in res["pairs"].items()]
    parts += [f"{k} NLL {v['nll']['value']:.4f}" for k, v in res["nll"].items()]
    return ", ".join(parts)


@dataclasses.dataclass
class Demo:
    plan: DemoPlan
    out: Path
    log: Log = _stderr
    judge_url: str | None = None
    judge_model: str | None = None
    data_dir: str | None = None  # ../shared/data/em, for the judge's question sets at paper scale

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        self.data = self.out / "data"
        self._base_loaded = None
        self._runners: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def run_dir(self, method: str) -> Path:
        return self.out / "runs" / method

    def base_loaded(self) -> Any:
        if self._base_loaded is None:
            from emajax.models.hub import load_model

            self._base_loaded = load_model(self.plan.model, dtype=self.plan.dtype, param_dtype=self.plan.dtype)
        return self._base_loaded

    def runner(self, which: str = "full") -> Any:
        from emajax.demo.suite import MONITOR_SETS, demo_suite
        from emajax.eval.probes import ProbeRunner

        if which not in self._runners:
            suite = demo_suite(self.plan)
            if which == "monitor":
                suite = suite.subset(MONITOR_SETS)
            self._runners[which] = ProbeRunner(self.base_loaded().tokenizer, suite, max_len=self.plan.probe_max_len,
                                               batch_size=self.plan.probe_batch, buckets=self.plan.probe_bucket)
        return self._runners[which]

    def _check_plan(self) -> None:
        path = self.out / "plan.json"
        mine = dataclasses.asdict(self.plan)
        if path.is_file():
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(mine) if k != "methods" and old.get(k) != mine.get(k))
            if diff:
                raise ValueError(f"{path}: this output directory holds a demo with a different plan (changed: "
                                 f"{', '.join(diff)}); use another --out or delete it")
            mine["methods"] = list(dict.fromkeys([*old.get("methods", []), *self.plan.methods]))
        atomic.write_json(path, mine)

    # ------------------------------------------------------------------ stages
    def write_data(self) -> None:
        from emajax.demo.suite import write_train_set

        write_train_set(self.plan, self.data / "narrow_train.jsonl")

    def base_probes(self) -> None:
        from emajax.eval.probes import write_results

        res = self.runner()(self.base_loaded().model)
        res.update(method="base", label="Base model", model=self.plan.model)
        write_results(res, self.out / "base" / "probes.json")
        atomic.write_json(self.out / "base" / "method.json",
                          {"method": "base", "label": "Base model", "model": self.plan.model})
        self.log(f"  base: {_fmt_probe(res)}")

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

    def select_pp(self) -> None:
        """Interleaving++: score the safe pool (base vs the no-defense adapter), keep the top examples."""
        from emajax.data import safe_pool_path
        from emajax.defenses.interleave import num_safe
        from emajax.scoring.adapters import ModelSpec
        from emajax.scoring.plan import read_pool
        from emajax.scoring.score import Scorer, score_pool
        from emajax.scoring.select import SelectOptions, select, write_selection
        from emajax.scoring.shards import read_manifest, read_scores

        adapter = self.run_dir("none") / "export"
        scorer = Scorer(self.base_loaded(), [ModelSpec("none", str(adapter), "adapter")])
        scores_dir = self.out / "interleave_pp_scores"
        score_pool(scorer, safe_pool_path(), scores_dir, fmt="jsonl", max_len=self.plan.probe_max_len,
                   min_bucket=self.plan.probe_bucket, progress=False)
        k = num_safe(self.plan.n_train, self.plan.interleave_ratio)
        if k == 0:
            raise ValueError(f"interleave ratio {self.plan.interleave_ratio} of {self.plan.n_train} examples mixes in "
                             f"no safe example; Interleaving++ has nothing to select")
        chosen, stats = select(read_pool(safe_pool_path()), read_scores(scores_dir), read_manifest(scores_dir),
                               SelectOptions(top_k=k))
        write_selection(self.data / "interleave_pp_selection.jsonl", chosen, "interleave++")
        self.log(f"  Interleaving++ selection: top {len(chosen)} of {stats['eligible']} eligible pool chats "
                 f"(scores {stats.get('score_min', float('nan')):.3f}..{stats.get('score_max', float('nan')):.3f})")

    def train_method(self, method: str) -> None:
        from emajax.data import safe_pool_path
        from emajax.eval.probes import read_results, write_results
        from emajax.train.config import config_from_dict
        from emajax.train.loop import train

        run_dir = self.run_dir(method)
        raw = self.plan.train_config(method, str(self.data / "narrow_train.jsonl"),
                                     vector=str(self.out / "persona" / "evil.safetensors"),
                                     selection=str(self.data / "interleave_pp_selection.jsonl"),
                                     pool=str(safe_pool_path()))
        cfg = config_from_dict(raw, source=f"demo:{method}")
        cfg.out = str(run_dir)
        label = METHODS[method][0]
        meta = {"method": method, "label": label, "model": self.plan.model}
        atomic.write_json(run_dir / "method.json", meta)
        base = read_results(self.out / "base" / "probes.json")
        mon = Monitor(run_dir, self.runner("monitor"), self.runner(), self.plan.monitor_every, base, meta, self.log)
        res = train(cfg, run_dir, callback=mon)
        final = mon.final
        if final is None:  # training was already complete (resumed after the last step): probe the export
            final = {**self._probe_adapter(res.export_dir or run_dir / "export"), **meta, "step": res.final_step}
        write_results(final, run_dir / "probes.json")

    def _probe_adapter(self, adapter_dir: Path) -> dict:
        from emajax.models.hf_io import load_peft_adapter
        from emajax.models.hub import load_model
        from emajax.models.lora import LoraConfig

        lora = LoraConfig(rank=self.plan.lora_rank, alpha=self.plan.lora_alpha, rslora=True)
        loaded = load_model(self.plan.model, dtype=self.plan.dtype, param_dtype=self.plan.dtype, lora=lora)
        load_peft_adapter(loaded.model, adapter_dir)
        return self.runner()(loaded.model)

    def judge(self, method: str) -> None:
        """Paper scale: general and in-domain (code) EM with the LLM judge, answers sampled locally."""
        from emajax.eval.em import local_sampler, run_em_eval
        from emajax.eval.judge import JudgeClient
        from emajax.eval.questions import load_questions, question_set_path
        from emajax.paths import cache_dir
        from emajax.serve import load_model_with_adapter

        adapter = None if method == "base" else str(self.run_dir(method) / "export")
        out = self.out / "base" if method == "base" else self.run_dir(method)
        loaded = load_model_with_adapter(self.plan.model, adapter, dtype=self.plan.dtype)
        client = JudgeClient(self.judge_url, self.judge_model, cache_path=cache_dir() / "judge_cache.sqlite")
        sampler = local_sampler(loaded, progress=True)
        for qset in ("general", "code"):
            qs = load_questions(question_set_path(qset, self.data_dir))
            run_em_eval(qs, qset, out, client, sampler=sampler, n=self.plan.judge_samples,
                        meta={"model": self.plan.model, "adapter": adapter}, progress=True)

    # ------------------------------------------------------------------ the whole thing
    def run(self) -> Path:
        from emajax.eval.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        self._check_plan()
        enable_compile_cache(self.out / "xla_cache")
        timer = Timer(self.out / "timings.json", self.log)
        methods = list(self.plan.methods)
        if "interleave_pp" in methods:  # scored with the no-defense model: train that first
            methods.remove("interleave_pp")
            methods.append("interleave_pp")
        n_stages = 2 + ("steering" in methods) + len(methods) + ("interleave_pp" in methods) + 1
        k = iter(range(1, n_stages + 1))
        tag = lambda name: f"{next(k)}/{n_stages} {name}"  # noqa: E731
        timer.run(tag("data"), self.write_data, skip=(self.data / "narrow_train.jsonl").is_file())
        timer.run(tag("base probes"), self.base_probes, skip=(self.out / "base" / "probes.json").is_file())
        if "steering" in methods:
            timer.run(tag("persona vector"), self.persona, skip=(self.out / "persona" / "evil.safetensors").is_file())
        for m in methods:
            if m == "interleave_pp":
                timer.run(tag("Interleaving++ selection"), self.select_pp,
                          skip=(self.data / "interleave_pp_selection.jsonl").is_file())
            timer.run(tag(f"train {m}"), lambda m=m: self.train_method(m),
                      skip=(self.run_dir(m) / "probes.json").is_file())
        if self.plan.judge:
            if not (self.judge_url and self.judge_model):
                raise ValueError("paper scale needs the judge: --judge-url and --judge-model "
                                 "(or EMAJAX_JUDGE_URL / EMAJAX_JUDGE_MODEL)")
            for m in ["base", *methods]:
                done = (self.out / "base" if m == "base" else self.run_dir(m)) / "em_general.json"
                timer.run(f"judge {m}", lambda m=m: self.judge(m), skip=done.is_file())
        run_dirs = [self.out / "base"] + [self.run_dir(m) for m in methods]
        report = timer.run(tag("report"), lambda: write_report(run_dirs, self.out, baseline=self.run_dir("none")
                                                                 if "none" in methods else None,
                                                                 title=f"emajax demo ({self.plan.scale} scale, "
                                                                       f"{self.plan.model})",
                                                                 timings=timer.data))
        timer.finish()
        self.log(f"[demo {timer.elapsed():7.1f}s] done: {report}")
        return report
