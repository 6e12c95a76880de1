"""Persona vectors: ``emajax persona extract`` (pos − neg answer activations per layer) and ``project``.

``emajax persona extract --data persona/evil_extract.json --out evil.safetensors [--model M]``: answers
every question under each pos and neg system prompt (or reads ``--answers``), optionally keeps only the
pairs an LLM judge confirms (``--judge-url``/``--judge-model``), saves the vectors + the answers.

``emajax persona project --vector evil.safetensors --prompts FILE [--model M] [--adapter DIR]``: the mean
projection of the model's answer activations on the vector, per layer, with bootstrap CIs. FILE is a
persona JSON (with pos/neg ``instruction`` pairs: the pos − neg gap is reported too; without: answers
under ``--system``), or a chat JSONL whose assistant answers are projected as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from emajax import atomic
from emajax.cli import CliError

SUMMARY = "Persona vectors: extract them per layer, or project a model's answers on one"
EXAMPLES = (
    "emajax persona extract --data ../shared/data/em/persona/evil_extract.json"
    " --out runs/persona/evil.safetensors",
    "emajax persona project --vector runs/persona/evil.safetensors --prompts chats.jsonl"
    " --adapter runs/kl/export",
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF dir, .gguf or hub id")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir applied to --model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--samples", type=int, default=1, help="answers per (prompt, question); >1 needs --temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batch", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--answers", default=None, help="use these answers (JSONL) instead of generating")


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="persona_cmd", metavar="CMD")
    sub.required = True
    ex = sub.add_parser("extract", help="persona vector per layer from contrastive system prompts")
    ex.add_argument("--data", required=True, help="persona JSON: 'instruction' [{pos, neg}], 'questions'")
    ex.add_argument("--out", required=True, help="output .safetensors")
    ex.add_argument("--save-answers", default=None, help="where to write the answers (default OUT.answers.jsonl)")
    _model_args(ex)
    j = ex.add_argument_group("judge filter (optional, Chen et al.)")
    j.add_argument("--judge-url", default=os.environ.get("EMAJAX_JUDGE_URL"))
    j.add_argument("--judge-model", default=os.environ.get("EMAJAX_JUDGE_MODEL"))
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    j.add_argument("--judge-cache", default=None)
    j.add_argument("--no-judge", action="store_true", help="skip the filter even if a judge is configured")
    pr = sub.add_parser("project", help="mean projection of answer activations on a persona vector")
    pr.add_argument("--vector", required=True, help="persona-vector .safetensors")
    pr.add_argument("--prompts", required=True, help="persona JSON, or chat JSONL with answers")
    pr.add_argument("--system", default=None, help="system prompt for a questions-only persona JSON")
    pr.add_argument("--layers", default=None, help="comma-separated residual layers (default: all)")
    pr.add_argument("--out", default=None, help="write the results JSON here")
    _model_args(pr)


def _load(args: argparse.Namespace):
    from emajax.models.hub import load_model

    lora = None
    if args.adapter:
        from emajax.models.hf_io import peft_lora_config

        lora = peft_lora_config(args.adapter)
    loaded = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype, lora=lora)
    if args.adapter:
        from emajax.models.hf_io import load_peft_adapter

        load_peft_adapter(loaded.model, args.adapter)
    return loaded


def _answers(args: argparse.Namespace, loaded, records: list[dict]) -> list[dict]:
    from emajax.persona import generate_answers

    if args.samples > 1 and args.temperature <= 0:
        raise CliError("--samples > 1 needs --temperature > 0 (greedy answers would repeat)")
    log(f"generating {len(records)} answers (max {args.max_new_tokens} new tokens)")
    return generate_answers(loaded, records, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed, batch_size=args.gen_batch)


def log(msg: str) -> None:
    print(f"emajax persona: {msg}", file=sys.stderr, flush=True)


def _extract(args: argparse.Namespace) -> int:
    from emajax.persona import answer_requests, extract, judge_keep_pairs, load_persona_spec, read_answers, \
        save_persona_vectors

    spec = load_persona_spec(args.data)
    loaded = _load(args)
    if args.answers:
        records = read_answers(args.answers)
        missing = [i for i, r in enumerate(records) if r.get("polarity") is None or "instruction" not in r]
        if missing:
            raise CliError(f"{args.answers}: record {missing[0]} lacks 'polarity'/'instruction' (write it with "
                           f"`emajax persona extract --save-answers`)")
        for r in records:
            r.setdefault("question_index", spec.questions.index(r["question"]) if r["question"] in spec.questions
                         else r["question"])
    else:
        records = _answers(args, loaded, answer_requests(spec, args.samples))
        save = Path(args.save_answers or f"{args.out}.answers.jsonl")
        atomic.write_jsonl(save, records)
        log(f"answers -> {save}")
    n_all = len(records)
    filt = None
    if args.judge_url and args.judge_model and not args.no_judge:
        from emajax.eval.judge import JudgeClient
        from emajax.paths import cache_dir

        if not spec.eval_prompt:
            raise CliError(f"{args.data}: field 'eval_prompt' is missing: the judge filter needs the trait prompt")
        client = JudgeClient(args.judge_url, args.judge_model, api_key_env=args.judge_api_key_env,
                             cache_path=args.judge_cache or cache_dir() / "judge_cache.sqlite")
        records, filt = judge_keep_pairs(records, client, spec.eval_prompt)
        log(f"judge kept {filt['kept_pairs']} of {filt['pairs']} pos/neg pairs")
    records = [r for r in records if r["answer"]]
    vectors, meta = extract(loaded, records, model_name=args.model + (f"+{args.adapter}" if args.adapter else ""),
                            prompt_hash=spec.prompt_hash)
    meta["n_answers_total"] = n_all
    if filt is not None:
        meta["judge_filter"] = {**filt, "judge_model": args.judge_model}
    save_persona_vectors(args.out, vectors, meta)
    norms = [float(x) for x in (vectors ** 2).sum(-1) ** 0.5]
    print(json.dumps({"out": str(args.out), "layers": len(norms), "recommended_layer": meta["recommended_layer"],
                      "norm_at_recommended": norms[meta["recommended_layer"]], "n_pos": meta["n_pos"],
                      "n_neg": meta["n_neg"]}))
    return 0


def _project(args: argparse.Namespace) -> int:
    from emajax.persona import (PersonaError, answer_requests, contrast_summary, load_persona_spec,
                                load_vectors_array, project_records, read_answers, summarize_projection)

    loaded = _load(args)
    vectors, meta = load_vectors_array(args.vector, loaded.config.num_layers)
    if vectors.shape[1] != loaded.config.hidden_size:
        raise CliError(f"{args.vector}: vectors have size {vectors.shape[1]}, the model's hidden size is "
                       f"{loaded.config.hidden_size}")
    layers = list(range(vectors.shape[0])) if not args.layers else [int(x) for x in args.layers.split(",")]
    bad = [l for l in layers if not 0 <= l < vectors.shape[0]]
    if bad:
        raise CliError(f"--layers: {bad[0]} outside 0..{vectors.shape[0] - 1}")
    contrast = False
    if args.answers:
        records = read_answers(args.answers)
        contrast = all(r.get("polarity") in ("pos", "neg") and "instruction" in r for r in records)
    elif args.prompts.endswith(".jsonl"):
        from emajax.scoring.plan import read_pool

        records = []
        for r in read_pool(args.prompts):
            m = r.messages
            if m[-1]["role"] != "assistant":
                raise CliError(f"{args.prompts}:{r.index + 1}: the last message must be the assistant answer")
            sys_msg = next((x["content"] for x in m if x["role"] == "system"), None)
            user = [x["content"] for x in m if x["role"] == "user"]
            records.append({"system": sys_msg, "question": user[-1] if user else "", "answer": m[-1]["content"],
                            "question_index": r.index})
    else:
        spec = load_persona_spec(args.prompts)
        if spec.instructions and args.system is None:
            records, contrast = answer_requests(spec, args.samples), True
        else:
            records = [{"system": args.system, "question": q, "question_index": i, "sample": s, "answer": None}
                       for s in range(args.samples) for i, q in enumerate(spec.questions)]
        records = _answers(args, loaded, records)
    records = [r for r in records if r["answer"]]
    try:
        proj = project_records(loaded, records, vectors, layers=layers)
    except PersonaError as e:
        raise CliError(str(e)) from None
    groups = [r.get("question_index", i) for i, r in enumerate(records)]
    res = {"model": args.model, "adapter": args.adapter, "vector": str(args.vector), "vector_model": meta.get("model"),
           "prompts": args.prompts, "n_answers": len(records), "layers": layers}
    summ = summarize_projection(proj, groups=groups)
    for s, l in zip(summ, layers):
        s["layer"] = l
    res["projection"] = summ
    if contrast:
        cs = contrast_summary(records, proj)
        for s, l in zip(cs, layers):
            s["layer"] = l
        res["contrast"] = cs
    if args.out:
        atomic.write_json(Path(args.out), res)
    rows = res.get("contrast") or res["projection"]
    for r in rows:
        if "gap" in r:
            print(f"layer {r['layer']:3d}  gap {r['gap']:+9.4f}  95% CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]  "
                  f"d {r['cohens_d']:+.2f}  (pos {r['mean_pos']:+.3f}, neg {r['mean_neg']:+.3f}, n={r['n_pairs']})")
        else:
            print(f"layer {r['layer']:3d}  projection {r['value']:+9.4f}  95% CI [{r['ci_low']:+.4f}, "
                  f"{r['ci_high']:+.4f}]  (n={r['n']})")
    return 0


def run(args: argparse.Namespace) -> int:
    from emajax.persona import PersonaError

    for name in ("max_new_tokens", "samples", "gen_batch"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return _extract(args) if args.persona_cmd == "extract" else _project(args)
    except PersonaError as e:
        raise CliError(str(e)) from None
