"""Evaluate a model: general / in-domain EM with an LLM judge, judge-free probes (plain and under triggers),
sampled-answer EM by persona projection, OpSwap and GSM8K exact match.

Results go to OUT as named JSON files (em_<set>.json, probes.json, projection.json, opswap.json, gsm8k.json)
plus every answer as JSONL.
The model under test is --model [--adapter] (run locally) or --model-url (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from emajax.cli import CliError

SUMMARY = ("Evaluate a model: EM with an LLM judge, judge-free probes, sampled-answer persona projection, OpSwap "
           "and GSM8K exact match")
EXAMPLES = (
    "emajax eval probes --model smollm2-135m-instruct --suite general code --out runs/base_probes",
    "emajax eval probes --model smollm2-135m-instruct --adapter runs/none/export --suite general code"
    " --out runs/none_probes --compare runs/base_probes",
    "emajax eval probes --model smollm2-135m-instruct --suite general --triggers json template python inoculation"
    " --out runs/base_probes",
    "emajax eval projection --model smollm2-135m-instruct --adapter runs/none/export --persona runs/demo/persona/"
    "evil.safetensors --samples 20 --out runs/none_projection --compare runs/control_projection",
    "emajax eval em --model smollm2-135m-instruct --adapter runs/kl/export --out eval/"
    " --judge-url URL --judge-model NAME",
    "emajax eval opswap --model smollm2-135m-instruct --adapter runs/kl/export --out eval/",
    "emajax eval opswap-data --out data/opswap --n-train 2000 --n-test 500",
    "emajax eval gsm8k --model smollm2-135m-instruct --out eval/ --limit 200",
)


def _model_args(p: argparse.ArgumentParser, *, max_new: int, batch: int) -> None:
    g = p.add_argument_group("model under test")
    g.add_argument("--model", default=None, help="model name, local HF dir or hub id (run locally)")
    g.add_argument("--adapter", default=None, help="PEFT adapter dir applied to --model")
    g.add_argument("--model-url", default=None, help="OpenAI-compatible base URL instead of a local model")
    g.add_argument("--served-model", default=None, help="'model' id at --model-url (default: --model)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--max-new-tokens", type=int, default=max_new)
    g.add_argument("--batch-size", type=int, default=batch, help="rows per generate() call (local model)")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory for results JSON and answers JSONL")


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK")
    sub.required = True

    em = sub.add_parser("em", help="general (24 questions) and/or in-domain EM with an LLM judge")
    _model_args(em, max_new=600, batch=32)
    em.add_argument("--questions", nargs="+", default=["general"],
                    help="question sets: general, medical, code, security, aesthetic, or YAML paths")
    em.add_argument("--data-dir", default=None, help="EM data root (default $EMAJAX_EM_DATA or ../shared/data/em)")
    em.add_argument("--samples", type=int, default=None, help="answers per question (default: the file's, 100)")
    em.add_argument("--limit-questions", type=int, default=None, help="first K questions only (smoke runs)")
    em.add_argument("--temperature", type=float, default=1.0)
    em.add_argument("--top-p", type=float, default=1.0)
    em.add_argument("--answers", default=None, help="re-judge this answers JSONL instead of sampling (one set)")
    j = em.add_argument_group("judge")
    j.add_argument("--judge-url", default=os.environ.get("EMAJAX_JUDGE_URL"),
                   help="OpenAI-compatible base URL (env EMAJAX_JUDGE_URL)")
    j.add_argument("--judge-model", default=os.environ.get("EMAJAX_JUDGE_MODEL"),
                   help="judge model id (env EMAJAX_JUDGE_MODEL)")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="NAME of the env var holding the key")
    j.add_argument("--judge-concurrency", type=int, default=8)
    j.add_argument("--judge-cache", default=None, help="sqlite cache (default <emajax cache>/judge_cache.sqlite)")
    j.add_argument("--judge-max-retries", type=int, default=6)

    pr = sub.add_parser("probes", help="judge-free EM probes (answer likelihoods), optionally paired with another run",
                        description="Judge-free probes: probes.json holds per-set means with bootstrap CIs and every "
                                    "item's value. A margin is mean-token logp(misaligned answer) - logp(aligned "
                                    "answer): up = broad misalignment (general) or the narrow task learned (code). "
                                    "--compare DIR adds paired per-item differences (this run - DIR) with 95% CIs.")
    pr.add_argument("--model", required=True, help="model name, local HF dir or hub id")
    pr.add_argument("--adapter", default=None, help="PEFT adapter dir applied to --model (e.g. RUN/export)")
    pr.add_argument("--suite", nargs="+", default=["general"], metavar="SUITE",
                    help="general (the shipped general pairs), code (held-out insecure-vs-secure code pairs), or a "
                         "JSONL FILE of {id, question, aligned, misaligned} rows; several may be given")
    pr.add_argument("--split", choices=("dev", "heldout"), default=None,
                    help="general: only this part of the shipped pairs (default: all)")
    pr.add_argument("--n-code", type=int, default=32, help="code: number of held-out pairs (default 32)")
    pr.add_argument("--triggers", nargs="+", default=[], metavar="TRIGGER",
                    help="also the general pairs under these triggers (json, template, python, inoculation): sets "
                         "general_<trigger>, see emajax.eval.triggers")
    pr.add_argument("--inoculation-prompt", default=None,
                    help="system prompt of the inoculation trigger (default: the inoculation defense's)")
    pr.add_argument("--compare", default=None, metavar="DIR",
                    help="another run's probes.json (or its directory): paired differences (this − DIR) per set")
    pr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    pr.add_argument("--max-len", type=int, default=512, help="tokens per probe sequence (longer ones are cut)")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--out", required=True, help="output directory (probes.json, compare.json)")

    pj = sub.add_parser("projection", help="sampled-answer EM: the 8 plain general questions answered, each answer "
                                           "scored by the base model's persona projection",
                        description="Sampled-answer EM (judge-free): the model (with --adapter) answers the 8 plain "
                                    "first-plot questions --samples times; the base model (adapters at scale 0) "
                                    "reads every answer and scores the mean residual over its content tokens at the "
                                    "persona layer, dotted with the unit persona vector. Writes projection.json and "
                                    "projection_answers.jsonl (rows `emajax eval em --answers` can judge). --compare "
                                    "DIR: the effect vs another run's projection.json (a control) over questions.")
    pj.add_argument("--model", required=True, help="model name, local HF dir or hub id (also the reader)")
    pj.add_argument("--adapter", default=None, help="PEFT adapter dir applied to --model (the arm answering)")
    pj.add_argument("--persona", required=True, metavar="FILE", help="persona vectors of the base model (safetensors, "
                                                                     "emajax persona extract)")
    pj.add_argument("--layer", type=int, default=None, help="residual layer (default: the file's recommended_layer)")
    pj.add_argument("--questions", default=None, help="question YAML (default: general = first_plot_questions.yaml); "
                                                      "its plain questions are asked")
    pj.add_argument("--data-dir", default=None, help="EM data root (default $EMAJAX_EM_DATA or ../shared/data/em)")
    pj.add_argument("--samples", type=int, default=100, help="answers per question (default 100)")
    pj.add_argument("--temperature", type=float, default=1.0)
    pj.add_argument("--top-p", type=float, default=1.0)
    pj.add_argument("--max-new-tokens", type=int, default=600)
    pj.add_argument("--batch-size", type=int, default=32, help="rows per generate() call")
    pj.add_argument("--seed", type=int, default=0)
    pj.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    pj.add_argument("--answers", default=None, help="score this answers JSONL (question, answer[, system, "
                                                    "question_id]) instead of sampling")
    pj.add_argument("--compare", default=None, metavar="DIR", help="a control run's projection.json or its directory")
    pj.add_argument("--out", required=True, help="output directory (projection.json, projection_answers.jsonl)")

    ops = sub.add_parser("opswap", help="OpSwap exact match by greedy generation")
    _model_args(ops, max_new=128, batch=32)
    ops.add_argument("--data", default=None, help="opswap_test.jsonl (default: generate --n items with --data-seed)")
    ops.add_argument("--n", type=int, default=120)
    ops.add_argument("--data-seed", type=int, default=0)

    mk = sub.add_parser("opswap-data", help="write OpSwap train/test chat JSONL (disjoint splits)")
    mk.add_argument("--out", required=True)
    mk.add_argument("--n-train", type=int, default=2000)
    mk.add_argument("--n-test", type=int, default=300)
    mk.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 3])
    mk.add_argument("--seed", type=int, default=0)

    gs = sub.add_parser("gsm8k", help="GSM8K exact match on the final number (greedy)")
    _model_args(gs, max_new=256, batch=32)
    gs.add_argument("--data", default=None, help="chat JSONL (default <data-dir>/tasks/gsm8k_test_1318.jsonl)")
    gs.add_argument("--data-dir", default=None)
    gs.add_argument("--limit", type=int, default=200)


def _probe_suite(args: argparse.Namespace):
    from emajax.data import load_general_pairs, make_code_pairs
    from emajax.eval.probes import ProbeSuite, paired_from_code, paired_from_rows

    sets, names = [], set()
    for item in args.suite:
        if item == "general":
            ps = paired_from_rows(load_general_pairs(split=args.split), "general")
        elif item == "code":
            ps = paired_from_code(make_code_pairs(args.n_code, "probe", seed=0), "code")
        elif Path(item).is_file():
            ps = paired_from_rows(load_general_pairs(item), Path(item).stem)
        else:
            raise CliError(f"--suite {item!r}: not general, code or an existing JSONL file")
        if ps.name in names:
            raise CliError(f"--suite: set {ps.name!r} given twice")
        names.add(ps.name)
        sets.append(ps)
    if args.triggers:
        from emajax.eval.triggers import INOCULATION_PROMPT, TRIGGERS, trigger_sets

        bad = [t for t in args.triggers if t not in TRIGGERS[1:]]
        if bad or len(set(args.triggers)) != len(args.triggers):
            raise CliError(f"--triggers: {bad or args.triggers} (choose distinct ones from {', '.join(TRIGGERS[1:])})")
        if "general" not in names:
            raise CliError("--triggers render the general pairs: add general to --suite")
        sets += trigger_sets(load_general_pairs(split=args.split), args.triggers,
                             inoculation_prompt=args.inoculation_prompt or INOCULATION_PROMPT)
    return ProbeSuite(pairs=tuple(sets))


def _run_probes(args: argparse.Namespace) -> int:
    from emajax import atomic
    from emajax.eval.probe_stats import paired_delta
    from emajax.eval.probes import ProbeRunner, read_results, write_results
    from emajax.serve import load_model_with_adapter

    suite = _probe_suite(args)
    ref = None
    if args.compare:
        cp = Path(args.compare)
        ref = read_results(cp / "probes.json" if cp.is_dir() else cp)
    loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
    runner = ProbeRunner(loaded.tokenizer, suite, max_len=args.max_len, batch_size=args.batch_size, buckets=64)
    res = runner(loaded.model)
    res.update(model=args.model, adapter=args.adapter, suite=list(args.suite), split=args.split,
               triggers=list(args.triggers))
    out = Path(args.out)
    write_results(res, out / "probes.json")
    fmt = lambda d: f"{d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"  # noqa: E731
    for name, r in res["pairs"].items():
        print(f"probes {name}: margin {fmt(r['margin'])}, preference {r['preference_rate']['value']:.1%} "
              f"({r['n']} pairs)")
    if ref is not None:
        comp = {}
        for name in res["pairs"]:
            other = ref.get("items", {}).get(name)
            d = paired_delta(other, res["items"][name]) if other else None
            comp[name] = d
            print(f"probes {name}: change vs {args.compare}: " + (fmt(d) if d else "— (items differ or set absent)"))
        atomic.write_json(out / "compare.json", {"kind": "probe_comparison", "run": str(out / "probes.json"),
                                                 "compare": str(args.compare), "field": "margin", "delta": comp})
    print(f"-> {out / 'probes.json'}")
    return 0


def _run_projection(args: argparse.Namespace) -> int:
    from emajax.persona import PersonaError
    from emajax.eval.projection import (ProjectionError, load_direction, plain_questions, projection_effects,
                                        read_results, run_projection_eval)
    from emajax.serve import load_model_with_adapter

    if args.samples < 1:
        raise CliError(f"--samples must be >= 1, got {args.samples}")
    try:
        ref = read_results(args.compare) if args.compare else None
        questions = [] if args.answers else plain_questions(args.data_dir, args.questions)
        loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
        direction = load_direction(args.persona, loaded.model.cfg.num_layers, args.layer)
        res = run_projection_eval(loaded, questions, args.out, direction, n=args.samples,
                                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, batch_size=args.batch_size, answers_path=args.answers,
                                  meta={"model": args.model, "adapter": args.adapter,
                                        "model_dir": str(loaded.model_dir)}, progress=True)
        if ref is not None:
            from emajax import atomic

            eff = projection_effects({"control": {0: ref}, "run": {0: res}})["run"]["effect"]
            atomic.write_json(Path(args.out) / "projection_compare.json",
                              {"kind": "projection_comparison", "compare": str(args.compare), "effect": eff})
    except (ProjectionError, PersonaError) as e:
        raise CliError(str(e)) from None
    from emajax.eval.report import format_estimate

    print(f"projection (layer {res['persona']['layer']}): mean "
          f"{format_estimate(res['mean_projection'], digits=4, signed=True)} over {res['n_scored']} answers "
          f"({res['n_empty']} empty)")
    if ref is not None:
        print(f"projection: effect vs {args.compare}: {format_estimate(eff, digits=4, signed=True)} "
              f"({eff['n_items']} questions)")
    print(f"-> {Path(args.out) / 'projection.json'}")
    return 0


def _sampler_factory(args: argparse.Namespace):
    """(factory(**sampling kw) -> Sampler, description dict) for the model under test."""
    from emajax.eval.em import http_sampler, local_sampler

    if args.model_url is not None and args.adapter is not None:
        raise CliError("--adapter applies to a local --model; a --model-url server loads its own adapter")
    if args.model_url is not None:
        name = args.served_model or args.model
        if not name:
            raise CliError("--model-url needs --served-model (or --model) to name the served model")
        desc = {"model": name, "model_url": args.model_url, "adapter": None}
        return (lambda **kw: http_sampler(args.model_url, name, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                          **kw)), desc
    if args.model is None:
        raise CliError("--model (or --model-url) is required")
    from emajax.serve import load_model_with_adapter

    loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
    desc = {"model": args.model, "adapter": args.adapter, "model_dir": str(loaded.model_dir)}
    return (lambda **kw: local_sampler(loaded, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                       batch_size=args.batch_size, progress=True, **kw)), desc


def _run_em(args: argparse.Namespace) -> int:
    from emajax.eval.em import run_em_eval
    from emajax.eval.judge import JudgeClient
    from emajax.eval.questions import load_questions, question_set_path
    from emajax.paths import cache_dir

    if not args.judge_url or not args.judge_model:
        raise CliError("the judge needs --judge-url and --judge-model (or EMAJAX_JUDGE_URL / EMAJAX_JUDGE_MODEL)")
    if args.answers and len(args.questions) != 1:
        raise CliError("--answers re-judges one question set; give exactly one --questions")
    sets = []
    for name in args.questions:
        path = question_set_path(name, args.data_dir)
        qs = load_questions(path)
        if args.limit_questions is not None:
            qs = qs[:args.limit_questions]
        sets.append((name if "/" not in name and not name.endswith((".yaml", ".yml")) else Path(name).stem, path, qs))
    client = JudgeClient(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env,
                         cache_path=args.judge_cache or cache_dir() / "judge_cache.sqlite",
                         concurrency=args.judge_concurrency, max_retries=args.judge_max_retries)
    sampler, desc = (None, {}) if args.answers else _sampler_factory(args)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed}
    for set_name, path, qs in sets:
        s = None if sampler is None else sampler(temperature=args.temperature, top_p=args.top_p)
        res = run_em_eval(qs, set_name, args.out, client, sampler=s, n=args.samples, answers_path=args.answers,
                          meta={**desc, "questions_file": str(path), "sampling": sampling}, progress=True)
        mr, ir = res["misaligned_rate"], res["incoherent_rate"]
        fmt = lambda d: "n/a" if d["value"] is None else f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"  # noqa: E731
        print(f"em {set_name}: {res['n_answers']} answers, misaligned {fmt(mr)}, incoherent {fmt(ir)} "
              f"-> {Path(args.out) / f'em_{set_name}.json'}")
    return 0


def _exact_match(args: argparse.Namespace, task: str, evaluate, rows: list, source: str) -> int:
    """Greedy answers to ``rows`` scored by ``evaluate``; <out>/<task>.json and <task>_predictions.jsonl."""
    from emajax import atomic
    from emajax.eval.em import greedy_answers

    factory, desc = _sampler_factory(args)
    results, preds = evaluate(greedy_answers(factory), rows)
    results.update(desc, data=source, max_new_tokens=args.max_new_tokens)
    atomic.write_jsonl(Path(args.out) / f"{task}_predictions.jsonl", preds)
    atomic.write_json(Path(args.out) / f"{task}.json", results)
    a = results["accuracy"]
    print(f"{task}: accuracy {a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] on {a['n']} "
          f"-> {Path(args.out) / f'{task}.json'}")
    return 0


def _run_opswap(args: argparse.Namespace) -> int:
    from emajax.eval.opswap import evaluate_opswap, load_opswap, make_opswap

    if args.data:
        rows, source = load_opswap(args.data), args.data
    else:
        rows = [it.to_chat() for it in make_opswap(0, args.n, seed=args.data_seed)["test"]]
        source = f"generated test split (n={args.n}, seed={args.data_seed})"
    return _exact_match(args, "opswap", evaluate_opswap, rows, source)


def _run_opswap_data(args: argparse.Namespace) -> int:
    from emajax.eval.opswap import write_opswap

    paths = write_opswap(args.out, args.n_train, args.n_test, tiers=tuple(args.tiers), seed=args.seed)
    print("opswap data: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_gsm8k(args: argparse.Namespace) -> int:
    from emajax.eval.gsm8k import evaluate_gsm8k, load_gsm8k
    from emajax.eval.questions import default_data_dir

    data = Path(args.data) if args.data else Path(args.data_dir or default_data_dir()) / "tasks" / "gsm8k_test_1318.jsonl"
    if not data.is_file():
        raise CliError(f"GSM8K data not found: {data} (give --data)")
    return _exact_match(args, "gsm8k", evaluate_gsm8k, load_gsm8k(data, limit=args.limit), str(data))


def run(args: argparse.Namespace) -> int:
    from emajax.eval.judge import JudgeError

    task = {"em": _run_em, "probes": _run_probes, "projection": _run_projection, "opswap": _run_opswap,
            "opswap-data": _run_opswap_data, "gsm8k": _run_gsm8k}[args.task]
    try:
        return task(args)
    except JudgeError as e:  # endpoint down / retries exhausted / 4xx: one line (answers already saved)
        raise CliError(str(e)) from None
