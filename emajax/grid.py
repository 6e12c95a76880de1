"""The paper's experiment grid: domains x defenses x seeds, each cell trained, evaluated and collected.

A grid spec (YAML, e.g. configs/grid/paper.yaml) names the narrow domains (training data + in-domain EM
question set), the defense arms (a training config each, e.g. configs/paper/*.yaml) and the seeds. For
every cell ``OUT/<domain>/<defense>/seed-<s>/`` the runner

1. trains: the arm's config with ``data.train`` = the domain's data, ``train.seed`` = s, and the spec's
   ``overrides`` (``train/``; ``emajax.train.loop.train`` resumes a killed run from its checkpoints);
2. evaluates the exported adapter: general EM and in-domain EM with the LLM judge
   (``emajax.eval.em.run_em_eval``) and OpSwap exact match (``eval/``);

and writes ``OUT/grid.json`` (the cells and where their results are), from which ``emajax report OUT``
(``emajax.eval.paper_table``) builds the paper's table. Arms with a ``select`` entry are Interleaving+ /
Interleaving++: their safe data is chosen per domain from the spec's ``selection.pool`` by the
perplexity-gap score of the ``selection.ensemble`` arm's trained adapters (one per domain, seed
``selection.seed``) with the cell's own domain left out (``emajax score`` + ``emajax select``), so those
cells run after the ensemble is trained and scored (``selection/``).

Every stage leaves an atomically written result and is skipped when it exists, so rerunning the same
command resumes the grid. On a pod slice or a multi-GPU host the training of each cell is one SPMD job
over the whole mesh (run the command on every host, as ``emajax train``, with the grid directory on
storage every host sees); scoring and evaluation run on process 0 while the others wait at a barrier.
Cells left out with ``only`` are not run, except the ensemble cells a selected Interleaving+/++ cell needs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from emajax import atomic
from emajax.hosts import barrier, is_main, start
from emajax.train.config import (TrainConfigError, config_from_dict, parse_overrides, parse_section,
                                 read_config_yaml, resolve_path)


class GridError(ValueError):
    """A grid spec that cannot run; the message names the file and the key."""


@dataclasses.dataclass
class SelectArm:
    top_k: int = 5000  # the released filter script's default
    refusal_filter: bool = True  # true: Interleaving++, false: Interleaving+


@dataclasses.dataclass
class SelectionCfg:
    pool: str | None = None  # the general pool (JSONL or hf: source)
    ensemble: str = "none"  # the arm whose per-domain adapters form the misaligned ensemble
    seed: int = 0  # which seed's adapters
    epsilon: float = 1.0
    dtype: str = "float32"
    max_len: int = 2048
    batch_tokens: int = 4096
    shard_size: int = 512


@dataclasses.dataclass
class JudgeCfg:
    url: str | None = None  # default: $EMAJAX_JUDGE_URL
    model: str | None = None  # default: $EMAJAX_JUDGE_MODEL
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key (never the key)
    concurrency: int = 8
    cache: str | None = None  # sqlite cache (default <emajax cache>/judge_cache.sqlite)


@dataclasses.dataclass
class EvalCfg:
    em: bool = True  # general and in-domain EM with the judge
    general: str = "general"  # question set (name or YAML path)
    samples: int | None = None  # answers per question (null: the file's)
    limit_questions: int | None = None  # first K questions of each set (smoke runs)
    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    dtype: str = "float32"
    data_dir: str | None = None  # EM data root (default $EMAJAX_EM_DATA or ../shared/data/em)
    opswap: int = 120  # OpSwap test items (0: skip)
    opswap_max_new_tokens: int = 128
    judge: JudgeCfg = dataclasses.field(default_factory=JudgeCfg)


@dataclasses.dataclass
class Domain:
    name: str
    train: list[str]
    questions: str  # in-domain EM question set (name or YAML path)

    @property
    def question_set(self) -> str:
        q = self.questions
        return Path(q).stem if q.endswith((".yaml", ".yml")) or "/" in q else q


@dataclasses.dataclass
class Arm:
    name: str
    config: Path
    select: SelectArm | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
    domain: str
    defense: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.defense}/seed-{self.seed}"


@dataclasses.dataclass
class GridSpec:
    source: Path
    out: Path
    seeds: list[int]
    domains: dict[str, Domain]
    arms: dict[str, Arm]
    overrides: list[str]
    selection: SelectionCfg
    eval: EvalCfg

    def cells(self) -> list[Cell]:
        return [Cell(d, a, s) for d in self.domains for a in self.arms for s in self.seeds]

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / cell.domain / cell.defense / f"seed-{cell.seed}"

    def selection_file(self, domain: str, arm: str) -> Path:
        return self.out / "selection" / f"{domain}-{arm}.jsonl"


# ----------------------------------------------------------------------------- the spec
def load_grid(path: str | Path, out: str | None = None) -> GridSpec:
    """Parse and check a grid spec; relative paths resolve against its directory, then the cwd, then the
    repository root (as training configs do)."""
    path = Path(path)
    try:
        raw = read_config_yaml(path)
    except TrainConfigError as e:
        raise GridError(str(e)) from None
    known = {"out", "seeds", "domains", "defenses", "overrides", "selection", "eval"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise GridError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    base = path.resolve().parent

    def where(key: str) -> str:
        return f"{path}: {key}"

    def res(p: str, key: str, must_exist: bool = True) -> str:
        try:
            return resolve_path(str(p), base, must_exist=must_exist)
        except TrainConfigError as e:
            raise GridError(f"{where(key)}: {e}") from None

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds):
        raise GridError(f"{where('seeds')}: expected a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{where('seeds')}: {seeds} repeats a seed (a cell would count twice in the table)")
    domains: dict[str, Domain] = {}
    if not isinstance(raw.get("domains"), dict) or not raw["domains"]:
        raise GridError(f"{where('domains')}: expected a mapping of domain name -> {{train, questions}}")
    for name, d in raw["domains"].items():
        if not isinstance(d, dict) or set(d) - {"train", "questions"} or "train" not in d:
            raise GridError(f"{where(f'domains.{name}')}: expected {{train: [sources], questions: set}}")
        train = d["train"] if isinstance(d["train"], list) else [d["train"]]
        if not train or not all(isinstance(t, str) and t for t in train):
            raise GridError(f"{where(f'domains.{name}.train')}: expected one or more data sources (paths or hf: names)")
        q = str(d.get("questions", name))
        if q.endswith((".yaml", ".yml")):
            q = res(q, f"domains.{name}.questions")
        domains[str(name)] = Domain(str(name), [res(t, f"domains.{name}.train") for t in train], q)
    arms: dict[str, Arm] = {}
    if not isinstance(raw.get("defenses"), dict) or not raw["defenses"]:
        raise GridError(f"{where('defenses')}: expected a mapping of defense name -> config (or {{config, select}})")
    for name, a in raw["defenses"].items():
        key = f"defenses.{name}"
        if isinstance(a, str):
            a = {"config": a}
        if not isinstance(a, dict) or "config" not in a or set(a) - {"config", "select"}:
            raise GridError(f"{where(key)}: expected a config path or {{config: PATH, select: {{...}}}}")
        sel = None
        if "select" in a:
            try:
                sel = parse_section(SelectArm, a["select"], f"{key}.select")
            except TrainConfigError as e:
                raise GridError(f"{path}: {e}") from None
        arms[str(name)] = Arm(str(name), Path(res(a["config"], f"{key}.config")), sel)
    try:
        selection = parse_section(SelectionCfg, raw.get("selection"), "selection")
        ev = parse_section(EvalCfg, raw.get("eval"), "eval")
    except TrainConfigError as e:
        raise GridError(f"{path}: {e}") from None
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise GridError(f"{where('overrides')}: expected a list of key=value strings")
    if any(a.select for a in arms.values()):
        if selection.pool is None:
            raise GridError(f"{where('selection.pool')}: arms with 'select' need the general pool to select from")
        if selection.ensemble not in arms or arms[selection.ensemble].select is not None:
            raise GridError(f"{where('selection.ensemble')}: {selection.ensemble!r} must be a defense arm without "
                            f"'select' (its adapters score the pool)")
        if len(domains) < 2:
            raise GridError(f"{where('domains')}: leaving the cell's domain out of the ensemble needs at least two "
                            f"domains")
        if selection.seed not in seeds:
            raise GridError(f"{where('selection.seed')}: {selection.seed} is not one of the grid's seeds")
        selection.pool = res(selection.pool, "selection.pool")
    if ev.data_dir:
        ev.data_dir = res(ev.data_dir, "eval.data_dir")
    if ev.general.endswith((".yaml", ".yml")):
        ev.general = res(ev.general, "eval.general")
    out_dir = Path(out or raw.get("out") or Path("runs") / path.stem)
    return GridSpec(path, out_dir.resolve(), seeds, domains, arms, list(overrides), selection, ev)


def cell_config(spec: GridSpec, cell: Cell) -> Any:
    """The training config of one cell: the arm's config + the grid's overrides + domain data and seed."""
    arm, dom = spec.arms[cell.defense], spec.domains[cell.domain]
    try:
        raw = read_config_yaml(arm.config)
        ovr = parse_overrides(spec.overrides) + [("data.train", list(dom.train)), ("train.seed", cell.seed),
                                                 ("out", str(spec.cell_dir(cell) / "train"))]
        if arm.select is not None:
            ovr.append(("defenses.interleave.data", [str(spec.selection_file(cell.domain, cell.defense))]))
        return config_from_dict(raw, overrides=ovr, base_dir=arm.config.parent, source=f"{arm.config} ({cell.key})")
    except TrainConfigError as e:
        raise GridError(str(e)) from None


# ----------------------------------------------------------------------------- running
def _log(msg: str) -> None:
    print(f"emajax grid: {msg}", file=sys.stderr, flush=True)


def _judge(spec: GridSpec) -> Any:
    from emajax.eval.judge import JudgeClient
    from emajax.paths import cache_dir

    j = spec.eval.judge
    url, model = j.url or os.environ.get("EMAJAX_JUDGE_URL"), j.model or os.environ.get("EMAJAX_JUDGE_MODEL")
    if not url or not model:
        raise GridError(f"{spec.source}: eval.judge needs url and model (or EMAJAX_JUDGE_URL / EMAJAX_JUDGE_MODEL)")
    return JudgeClient(url, model, api_key_env=j.api_key_env, concurrency=j.concurrency,
                       cache_path=j.cache or cache_dir() / "judge_cache.sqlite")


def train_cell(spec: GridSpec, cell: Cell) -> Path:
    """Train (or resume) one cell; ``train/done.json`` marks it finished. Returns the adapter directory."""
    from emajax.train.loop import train

    tdir = spec.cell_dir(cell) / "train"
    done = tdir / "done.json"
    if not done.is_file():
        cfg = cell_config(spec, cell)
        t0 = time.perf_counter()
        res = train(cfg, tdir)
        if is_main():
            atomic.write_json(done, {"steps": res.final_step, "total_steps": res.total_steps,
                                     "final": res.last_metrics, "wall_s": time.perf_counter() - t0})
    return tdir / "export"


def eval_cell(spec: GridSpec, cell: Cell, judge: Any) -> dict[str, str]:
    """General EM, in-domain EM and OpSwap of one cell's adapter into ``eval/`` (each skipped when done)."""
    from emajax.eval.em import greedy_answers, local_sampler, run_em_eval
    from emajax.eval.opswap import evaluate_opswap, make_opswap
    from emajax.eval.questions import load_questions, question_set_path
    from emajax.serve import load_model_with_adapter

    ev, dom = spec.eval, spec.domains[cell.domain]
    edir = spec.cell_dir(cell) / "eval"
    files = eval_files(spec, cell)
    sets = [("general", ev.general), (dom.question_set, dom.questions)] if ev.em else []
    todo = [s for s in sets if not files[s[0]].is_file()]
    need_opswap = "opswap" in files and not files["opswap"].is_file()
    if not todo and not need_opswap:
        return {k: str(v) for k, v in files.items()}
    cfg = cell_config(spec, cell)
    adapter = spec.cell_dir(cell) / "train" / "export"
    loaded = load_model_with_adapter(cfg.model.name, adapter, dtype=ev.dtype)
    meta = {"model": cfg.model.name, "adapter": str(adapter), "cell": cell.key}
    for name, qs_name in todo:
        qpath = question_set_path(qs_name, ev.data_dir)
        qs = load_questions(qpath)[: ev.limit_questions] if ev.limit_questions else load_questions(qpath)
        sampler = local_sampler(loaded, temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
                                seed=cell.seed, batch_size=ev.batch_size)
        res = run_em_eval(qs, name, edir, judge, sampler=sampler, n=ev.samples,
                          meta={**meta, "questions_file": str(qpath),
                                "sampling": {"temperature": ev.temperature, "top_p": ev.top_p,
                                             "max_new_tokens": ev.max_new_tokens, "seed": cell.seed}})
        _log(f"{cell.key}: em {name}: misaligned {res['misaligned_rate']['value']}, "
             f"incoherent {res['incoherent_rate']['value']} ({res['n_answers']} answers)")
    if need_opswap:
        rows = [it.to_chat() for it in make_opswap(0, ev.opswap, seed=0)["test"]]
        factory = lambda **kw: local_sampler(loaded, max_new_tokens=ev.opswap_max_new_tokens, seed=cell.seed,  # noqa: E731
                                             batch_size=ev.batch_size, **kw)
        results, preds = evaluate_opswap(greedy_answers(factory), rows)
        results.update(meta, data=f"generated test split (n={ev.opswap}, seed=0)",
                       max_new_tokens=ev.opswap_max_new_tokens)
        atomic.write_jsonl(edir / "opswap_predictions.jsonl", preds)
        atomic.write_json(edir / "opswap.json", results)
        _log(f"{cell.key}: opswap accuracy {results['accuracy']['value']:.3f}")
    return {k: str(v) for k, v in files.items()}


def eval_files(spec: GridSpec, cell: Cell) -> dict[str, Path]:
    """The result files the spec asks of a cell's evaluation: ``em_<set>.json`` per EM question set (general,
    in-domain) and ``opswap.json``."""
    edir = spec.cell_dir(cell) / "eval"
    files = {}
    if spec.eval.em:
        files = {name: edir / f"em_{name}.json" for name in ("general", spec.domains[cell.domain].question_set)}
    if spec.eval.opswap > 0:
        files["opswap"] = edir / "opswap.json"
    return files


def cell_state(spec: GridSpec, cell: Cell) -> str:
    """``evaluated`` (every result of :func:`eval_files` exists), ``trained`` or ``to do``."""
    if (spec.cell_dir(cell) / "train" / "done.json").is_file():
        return "evaluated" if all(p.is_file() for p in eval_files(spec, cell).values()) else "trained"
    return "to do"


def select_safe_data(spec: GridSpec) -> None:
    """Score the pool with the ensemble arm's adapters once, then write each (domain, select arm)'s chats
    with that domain left out (Interleaving+: no refusal filter; Interleaving++: with it)."""
    from emajax.scoring.adapters import parse_model_spec
    from emajax.scoring.plan import read_pool
    from emajax.scoring.score import Scorer, score_pool
    from emajax.scoring.select import SelectOptions, select, write_selection
    from emajax.scoring.shards import read_manifest, read_scores

    sel = spec.selection
    pending = [(d, a) for d in spec.domains for a, arm in spec.arms.items()
               if arm.select is not None and not spec.selection_file(d, a).is_file()]
    if not pending:
        return
    scores = spec.out / "selection" / "scores"
    ens_cfg = cell_config(spec, Cell(next(iter(spec.domains)), sel.ensemble, sel.seed))
    if not (scores / "manifest.json").is_file() or not _scores_complete(scores):
        members = [parse_model_spec(f"{d}={spec.cell_dir(Cell(d, sel.ensemble, sel.seed)) / 'train' / 'export'}")
                   for d in spec.domains]
        scorer = Scorer(ens_cfg.model.name, members, dtype=sel.dtype, param_dtype=sel.dtype)
        summary = score_pool(scorer, sel.pool, scores, epsilon=sel.epsilon, max_len=sel.max_len,
                             shard_size=sel.shard_size, batch_tokens=sel.batch_tokens, fmt="jsonl", progress=False,
                             log=_log)
        _log(f"scored {summary.n_examples} pool chats with {len(members)} adapters -> {scores}")
    rows = read_pool(sel.pool)
    manifest, table = read_manifest(scores), read_scores(scores)
    for d, a in pending:
        arm = spec.arms[a].select
        chosen, stats = select(rows, table, manifest, SelectOptions(top_k=arm.top_k, leave_out=(d,),
                                                                    refusal_filter=arm.refusal_filter))
        write_selection(spec.selection_file(d, a), chosen, "top-score")
        _log(f"selection {d}/{a}: {stats['selected']} of {stats['pool']} (refusals removed: {stats['refusal']})")


def _scores_complete(scores: Path) -> bool:
    from emajax.scoring.shards import read_manifest, shard_path

    m = read_manifest(scores)
    return all(shard_path(scores, k, m.get("format", "jsonl")).is_file() for k in range(int(m["n_shards"])))


def run_grid(spec: GridSpec, *, only: Callable[[Cell], bool] | None = None, judge: Any = None) -> Path:
    """Run (or resume) every cell, then write ``grid.json`` and the paper-layout report. Returns grid.json."""
    from emajax.eval.paper_table import write_grid_report

    start()  # a multi-process run is one JAX system before anything asks which process this is
    cells = [c for c in spec.cells() if only is None or only(c)]
    if not cells:
        raise GridError(f"{spec.source}: no cell matches the selection")
    if spec.eval.em and judge is None:
        judge = _judge(spec)
    needs_sel = any(spec.arms[c.defense].select is not None for c in cells)
    first = [Cell(d, spec.selection.ensemble, spec.selection.seed) for d in spec.domains] if needs_sel else []
    order = first + [c for c in cells if c not in first]
    t0 = time.perf_counter()
    for k, cell in enumerate(order, 1):
        if needs_sel and spec.arms[cell.defense].select is not None:
            if is_main():
                select_safe_data(spec)
            barrier("emajax-grid-selection")
        _log(f"[{k}/{len(order)}] {cell.key}: train ({time.perf_counter() - t0:.0f} s so far)")
        train_cell(spec, cell)
        if is_main():
            _log(f"[{k}/{len(order)}] {cell.key}: eval")
            eval_cell(spec, cell, judge)
        barrier(f"emajax-grid-{cell.key}")
    if not is_main():
        return spec.out / "grid.json"
    manifest = write_manifest(spec)
    report = write_grid_report(spec.out)
    _log(f"done: {manifest}, {report}")
    return manifest


def write_manifest(spec: GridSpec) -> Path:
    """``grid.json``: the grid's axes and, per cell, its directory and which results exist."""
    cells = []
    for c in spec.cells():
        d = spec.cell_dir(c)
        sets = {"general": "general", "in_domain": spec.domains[c.domain].question_set}
        cells.append({"domain": c.domain, "defense": c.defense, "seed": c.seed, "dir": str(d.relative_to(spec.out)),
                      "trained": (d / "train" / "done.json").is_file(),
                      "eval": {k: (d / "eval" / f"em_{v}.json").is_file() for k, v in sets.items()}
                      | {"opswap": (d / "eval" / "opswap.json").is_file()},
                      "sets": sets})
    return atomic.write_json(spec.out / "grid.json", {
        "kind": "emajax-grid", "spec": str(spec.source), "seeds": spec.seeds, "domains": list(spec.domains),
        "defenses": list(spec.arms), "general_set": spec.eval.general,
        "in_domain_sets": {d: v.question_set for d, v in spec.domains.items()},
        "cells": cells})
