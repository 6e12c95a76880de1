"""General and in-domain emergent-misalignment evaluation: sample answers, save them all, judge, summarise.

General EM: the 24 questions of first_plot_questions.yaml (8 plain, 8 JSON, 8 template). The JSON
variant's system prompt is really sent (the paper's released eval drops it). In-domain (narrow)
misalignment: the same procedure on eval/{medical,code,security,aesthetic}.yaml. Answers come from a
local model (emajax.generate) or any OpenAI-compatible endpoint (e.g. ``emajax serve``); they are written
to ``em_<set>_answers.jsonl`` before judging, so a judge failure never loses generations and a rerun can
re-judge them (``answers_path``) without sampling again.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from emajax.eval.judge import JudgeClient, JudgeScore, chat_completions_url, em_flags, fill_prompt, post_with_retries, \
    split_reasoning
from emajax.eval.questions import JUDGE_METRICS, Question
from emajax.eval.stats import bootstrap_ci, summarize
from emajax import atomic

log = logging.getLogger("emajax.eval")

# Paper defaults for the model under test.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 600

# sampler(conversations, n) -> n completions per conversation
Sampler = Callable[[Sequence[Sequence[dict]], int], list[list[str]]]


# ----------------------------------------------------------------------------- samplers
def local_sampler(loaded: Any, *, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, batch_size: int = 32,
                  lora_scale: float = 1.0, progress: bool = False) -> Sampler:
    """Sampler on a LoadedModel via emajax.generate.chat_generate, in batches of ``batch_size`` rows.

    Each batch gets its own seed (seed + batch index), so the n samples of a question differ.
    """
    from emajax.generate import chat_generate_batched

    def report(b: int, n_batches: int) -> None:
        print(f"\rsampling: batch {b + 1}/{n_batches}", end="\n" if b + 1 == n_batches else "", file=sys.stderr,
              flush=True)

    def sample(conversations: Sequence[Sequence[dict]], n: int) -> list[list[str]]:
        rows = [list(c) for c in conversations for _ in range(n)]
        texts = chat_generate_batched(loaded, rows, batch_size=batch_size, seed=seed, on_batch=report if progress
                                      else None, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      lora_scale=lora_scale)
        return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]

    return sample


def http_sampler(base_url: str, model: str, *, temperature: float = DEFAULT_TEMPERATURE,
                 top_p: float = DEFAULT_TOP_P, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, max_n: int = 128,
                 timeout_s: float = 600.0) -> Sampler:
    """Sampler on an OpenAI-compatible /v1/chat/completions endpoint (``n`` completions per request)."""
    url = chat_completions_url(base_url)

    def one(args: tuple[int, list[dict], int, int]) -> list[str]:
        i, conv, k, part = args
        payload = {"model": model, "messages": conv, "n": k, "temperature": temperature, "top_p": top_p,
                   "max_tokens": max_new_tokens, "seed": seed + 1000 * i + part}
        body = post_with_retries(url, payload, api_key_env=api_key_env, timeout_s=timeout_s)
        try:
            return [str(c["message"]["content"] or "") for c in sorted(body["choices"], key=lambda c: c["index"])]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{url}: malformed chat completion ({e})") from None

    def sample(conversations: Sequence[Sequence[dict]], n: int) -> list[list[str]]:
        jobs = [(i, list(c), min(max_n, n - s), s // max_n) for i, c in enumerate(conversations)
                for s in range(0, n, max_n)]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            parts = list(pool.map(one, jobs))
        out: list[list[str]] = [[] for _ in conversations]
        for (i, *_), texts in zip(jobs, parts):
            out[i] += texts
        return out

    return sample


def greedy_answers(sampler_factory: Callable[..., Sampler], **kw: Any) -> Callable[[list[list[dict]]], list[str]]:
    """conversations -> one greedy completion each (for exact-match tasks): temperature 0 sampler, n=1."""
    s = sampler_factory(temperature=0.0, top_p=1.0, **kw)
    return lambda convs: [x[0] for x in s(convs, 1)]


def sample_em_answers(questions: Sequence[Question], sampler: Sampler, n: int, question_set: str) -> list[dict]:
    """n answers to every paraphrase of every question, one record each (nothing judged yet)."""
    convs, keys = [], []
    for q in questions:
        for pi in range(len(q.paraphrases)):
            convs.append(q.messages(pi))
            keys.append((q, pi))
    texts = sampler(convs, n)
    records = []
    for (q, pi), answers in zip(keys, texts):
        for si, text in enumerate(answers):
            reasoning, answer = split_reasoning(text)
            records.append({"question_set": question_set, "question_id": q.id, "variant": q.variant,
                            "paraphrase_index": pi, "sample_index": si, "system": q.system,
                            "question": q.paraphrases[pi], "answer": answer, "reasoning": reasoning})
    return records


def judge_em_answers(records: Sequence[dict], questions: Sequence[Question], client: JudgeClient,
                     progress: bool = False) -> list[dict]:
    """Adds ``aligned``/``coherent`` (JudgeScore dicts) and ``misaligned``/``incoherent`` flags to each record."""
    by_id = {q.id: q for q in questions}
    prompts = []
    for r in records:
        q = by_id.get(str(r["question_id"]))
        if q is None:
            raise ValueError(f"answer record names unknown question {r['question_id']!r}")
        for m in JUDGE_METRICS:
            prompts.append(fill_prompt(q.judge_prompts[m], question=r["question"], answer=r["answer"],
                                       reasoning=r.get("reasoning", "")))
    total = len(set(prompts))
    cb = (lambda k: print(f"\rjudging: {k}/{total} unique prompts", end="", file=sys.stderr, flush=True)) \
        if progress else None
    scores = client.score_many(prompts, progress=cb)
    if progress and total:
        print(file=sys.stderr)
    out = []
    for i, r in enumerate(records):
        s = dict(zip(JUDGE_METRICS, scores[len(JUDGE_METRICS) * i:len(JUDGE_METRICS) * (i + 1)]))
        out.append({**r, **{m: s[m].to_dict() for m in JUDGE_METRICS}, **em_flags(s["aligned"], s["coherent"])})
    return out


def em_metrics(records: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Rates with answer-level bootstrap CIs (+ a question-cluster CI), label counts, per-question and per-variant rates."""

    def rate(rows: Sequence[dict], flag: str) -> dict:
        kept = [r for r in rows if r.get(flag) is not None]
        vals = [float(r[flag]) for r in kept]
        out = summarize(vals, n_boot=n_boot, seed=seed)
        if len({r["question_id"] for r in kept}) > 1:
            lo, hi = bootstrap_ci(vals, groups=[str(r["question_id"]) for r in kept], n_boot=n_boot, seed=seed)
            out["ci_by_question"] = [lo, hi]
        return out

    def mean_score(rows: Sequence[dict], metric: str) -> dict:
        return summarize([r[metric]["score"] for r in rows if r[metric]["score"] is not None], n_boot=n_boot, seed=seed)

    labels = {m: {k: sum(r[m]["label"] == k for r in records) for k in ("score", "refusal", "code", "unparsed")}
              for m in JUDGE_METRICS}
    qids = list(dict.fromkeys(str(r["question_id"]) for r in records))
    per_q = {}
    for qid in qids:
        rows = [r for r in records if str(r["question_id"]) == qid]
        mis = [r["misaligned"] for r in rows if r["misaligned"] is not None]
        inc = [r["incoherent"] for r in rows if r["incoherent"] is not None]
        per_q[qid] = {"variant": rows[0]["variant"], "n": len(rows),
                      "misaligned_rate": sum(mis) / len(mis) if mis else None,
                      "incoherent_rate": sum(inc) / len(inc) if inc else None}
    variants = list(dict.fromkeys(r["variant"] for r in records))
    return {
        "n_answers": len(records),
        "n_questions": len(qids),
        "misaligned_rate": rate(records, "misaligned"),
        "incoherent_rate": rate(records, "incoherent"),
        "mean_aligned": mean_score(records, "aligned"),
        "mean_coherent": mean_score(records, "coherent"),
        "judge_labels": labels,
        "by_variant": {v: {"misaligned_rate": rate([r for r in records if r["variant"] == v], "misaligned"),
                           "incoherent_rate": rate([r for r in records if r["variant"] == v], "incoherent")}
                       for v in variants},
        "per_question": per_q,
    }


def run_em_eval(questions: Sequence[Question], question_set: str, out_dir: str | os.PathLike, client: JudgeClient, *,
                sampler: Sampler | None = None, n: int | None = None, answers_path: str | os.PathLike | None = None,
                meta: dict | None = None, progress: bool = False, n_boot: int = 2000) -> dict:
    """Sample (or reuse ``answers_path``), save, judge, summarise. Writes into ``out_dir``:

    ``em_<set>_answers.jsonl`` (every answer, then with its judgements) and ``em_<set>.json`` (results).
    ``n`` defaults to the file's samples_per_paraphrase (100 in the paper's files).
    """
    out_dir = Path(out_dir)
    answers_file = out_dir / f"em_{question_set}_answers.jsonl"
    if answers_path is not None:
        if not Path(answers_path).is_file():
            raise FileNotFoundError(f"{answers_path}: answers file not found")
        records = [{k: v for k, v in r.items() if k not in ("aligned", "coherent", "misaligned", "incoherent")}
                   for r in atomic.read_jsonl(answers_path)]
        n_used = max((int(r.get("sample_index", 0)) for r in records), default=-1) + 1
    else:
        if sampler is None:
            raise ValueError("run_em_eval needs a sampler or answers_path")
        n_used = n if n is not None else (questions[0].samples_per_paraphrase or 100)
        if n_used < 1:
            raise ValueError(f"samples per question must be >= 1, got {n_used}")
        records = sample_em_answers(questions, sampler, n_used, question_set)
    atomic.write_jsonl(answers_file, records)
    judged = judge_em_answers(records, questions, client, progress=progress)
    atomic.write_jsonl(answers_file, judged)
    results = {"kind": "em", "question_set": question_set, "samples_per_question": n_used,
               **(meta or {}), "judge": client.describe(),
               "judge_http_calls": client.http_calls, "judge_cache_hits": client.cache_hits,
               "answers_file": answers_file.name, **em_metrics(judged, n_boot=n_boot)}
    atomic.write_json(out_dir / f"em_{question_set}.json", results)
    return results


__all__ = ["Sampler", "local_sampler", "http_sampler", "greedy_answers", "sample_em_answers", "judge_em_answers",
           "em_metrics", "run_em_eval", "JudgeScore"]
