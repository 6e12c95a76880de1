"""Does a narrow fine-tune wake up EM, and does each defense stop it? A controlled experiment with seeds.

``emajax demo [--out runs/demo] [--seeds N] [--seed-base K] [--scale cpu|paper|tiny] [--methods ...]``
trains, per seed, a control arm (the same prompts with secure answers), no defense and every defense on
insecure code, plus one benign-task arm per method; measures every arm with the judge-free probes and
writes report.md (Table 1 with pooled CIs and verdicts) and plots. ``--judge-url URL --judge-model M``
adds the LLM judge on the 24 general questions. ``--dose-steps 8 16 32 64`` runs the dose study instead.
``--domain medical`` (the shared bad-medical-advice set) or ``--domain FILE.jsonl`` (any chat set) trains the
narrow arms on another domain with a self-distilled control (``emajax.demo.domain``). ``--em-metrics`` (default
at cpu and paper scale) also measures EM two more ways per arm: the general pairs under trigger formats and the
base model's persona projection of the arm's own sampled answers, side by side in the report.
Re-running the same command resumes; more seeds can be added to the same --out later.
"""

from __future__ import annotations

import argparse
import os

from emajax.cli import CliError

SUMMARY = "The main job: does a narrow fine-tune wake up EM, and does each defense stop it (control arm, seeds)"
EXAMPLES = (
    "emajax demo --out runs/demo",
    "emajax demo --seeds 3 --out runs/demo3",
    "emajax demo --seeds 3 --seed-base 10 --out runs/demo3_k10",
    "emajax demo --judge-url http://127.0.0.1:8000/v1 --judge-model judge --data-dir ../shared/data/em",
    "emajax demo --dose-steps 8 16 32 64 --seeds 3 --out runs/dose",
    "emajax demo --seeds 3 --n-train 512 --out runs/demo3_64steps",
    "emajax demo --domain medical --data-dir ../shared/data/em --seeds 5 --out runs/demo_medical",
    "emajax demo --domain chats.jsonl --domain-heldout 50 --out runs/demo_chats",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    from emajax.demo.plan import METHODS

    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of training seeds (default: 1 at cpu scale, what fits make demo's 30 minutes; "
                        "3 at tiny and paper)")
    p.add_argument("--seed-base", type=int, default=0, help="first seed: seeds are K .. K+N-1 (default 0)")
    p.add_argument("--scale", choices=("cpu", "paper", "tiny"), default="cpu")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="scale", help="same as --scale tiny")
    p.add_argument("--model", default=None, help="model name or local HF dir (default: the scale's model)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {', '.join(METHODS)} (default: all; none and the control always run)")
    p.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="narrow training examples per arm (one epoch = N / batch optimiser steps; default: the "
                        "scale's, 128 = 16 steps at cpu)")
    p.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    p.add_argument("--lr", type=float, default=None, help="override the scale's learning rate")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="override the compute dtype (LoRA weights and optimiser state stay float32 on cpu)")
    p.add_argument("--probe-data", default=None, metavar="DIR",
                   help="also probe the shared security aligned/misaligned pairs of DIR (../shared/data/em)")
    p.add_argument("--dose-steps", type=int, nargs="+", default=None, metavar="N",
                   help="run the dose study instead: no defense and control probed at these optimiser steps")
    p.add_argument("--judge-url", default=os.environ.get("EMAJAX_JUDGE_URL"),
                   help="OpenAI-compatible judge endpoint (env EMAJAX_JUDGE_URL); fills the judge columns")
    p.add_argument("--judge-model", default=os.environ.get("EMAJAX_JUDGE_MODEL"),
                   help="judge model id (env EMAJAX_JUDGE_MODEL)")
    p.add_argument("--judge-samples", type=int, default=None, help="answers per general question (default: scale's)")
    p.add_argument("--data-dir", default=None,
                   help="EM data root holding eval/first_plot_questions.yaml and, for --domain medical, "
                        "sft/medical_misaligned_{train_100,eval}.jsonl (default: --probe-data, else "
                        "../shared/data/em)")
    p.add_argument("--domain", default="code", metavar="code|medical|FILE.jsonl",
                   help="the narrow task: code (default: insecure code, secure-code control), medical (the shared "
                        "bad-medical-advice set) or any chat JSONL; other than code the control arm trains on the "
                        "base model's own answers (self-distilled) and narrow learning is the held-out answers' NLL")
    p.add_argument("--domain-heldout", type=int, default=None, metavar="N",
                   help="--domain FILE.jsonl: conversations held out for the in-domain probe (default 20%%)")
    p.add_argument("--em-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help="per arm and the base model, also the general pairs under trigger formats and the persona "
                        "projection of sampled answers to the 8 plain first-plot questions (needs "
                        "eval/first_plot_questions.yaml under --data-dir); default on at cpu and paper scale, off at "
                        "tiny; re-running with it adds them to arms trained before")


DEFAULT_SEEDS = {"cpu": 1, "tiny": 3, "paper": 3}


def run(args: argparse.Namespace) -> int:
    from emajax.demo.domain import resolve_domain
    from emajax.demo.plan import make_plan

    if args.n_train is not None and args.n_train < 1:
        raise CliError(f"--n-train must be >= 1, got {args.n_train}")
    over = {k: v for k, v in (("n_train", args.n_train), ("epochs", args.epochs), ("lr", args.lr),
                              ("dtype", args.dtype), ("judge_samples", args.judge_samples),
                              ("probe_data", args.probe_data), ("em_metrics", args.em_metrics))
            if v is not None}
    if over.get("probe_data"):
        over["probe_data"] = os.path.abspath(over["probe_data"])
    n = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.scale]
    if n < 1:
        raise CliError(f"--seeds must be >= 1, got {n}")
    seeds = tuple(range(args.seed_base, args.seed_base + n))
    try:
        plan = make_plan(args.scale, model=args.model, methods=tuple(args.methods) if args.methods else None, **over)
        plan = resolve_domain(plan, args.domain, data_dir=args.data_dir or args.probe_data,
                              heldout=args.domain_heldout, n_train=args.n_train)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    if args.dose_steps and args.domain != "code":
        raise CliError("the dose study (--dose-steps) runs the code domain only; drop --domain")
    if args.dose_steps:
        from emajax.demo.dose import run_dose

        arms = [m for m in (args.methods or []) if m != "none"]
        report = run_dose(plan, args.out, seeds, args.dose_steps, arms=("none", "control", *arms))
        print(f"emajax demo (dose study): {report}")
        return 0
    from emajax.demo.pipeline import Demo

    if plan.judge and not (args.judge_url and args.judge_model):
        raise CliError("--scale paper evaluates with the LLM judge: give --judge-url and --judge-model "
                       "(or EMAJAX_JUDGE_URL / EMAJAX_JUDGE_MODEL)")
    if bool(args.judge_url) != bool(args.judge_model):
        raise CliError("the judge needs both --judge-url and --judge-model")
    report = Demo(plan, args.out, seeds=seeds, judge_url=args.judge_url, judge_model=args.judge_model,
                  data_dir=args.data_dir).run()
    print(f"emajax demo: {report}")
    return 0
