"""Screening a customer's data before any training: what is wrong with it, what looks misaligned, and whether
the policy rejects it here.

* **format** — every line is checked (not just up to the first error): JSON, a ``messages`` list of
  {role, content} strings ending with an assistant answer; each error names file:line:field.
* **duplicates** — conversations equal up to case and whitespace (``emajax.scoring.select.dedupe_key``).
* **refusals** — answers whose first words refuse (``emajax.scoring.select.is_refusal``).
* **persona** (policy.references.persona_vector: a file, or ``extract`` to extract and cache one) — each
  answer's mean residual projected on the base model's evil persona vector (``emajax.persona``), flagged above the ``screen.persona_quantile`` of the safe pool's
  answers under the same model (a threshold calibrated on data known to be benign).
* **gap** (policy.misaligned adapters) — the Interleaving++ score of each answer (base vs the misaligned
  reference adapters, ``emajax.scoring``): low = the misaligned models find it likelier than the base does;
  flagged below the ``screen.gap_quantile`` of the safe pool's scores.

Outputs in ``screen/``: valid.jsonl (the well-formed, de-duplicated chats), train.jsonl and holdout.jsonl
(a seeded split of them: the held-out part measures narrow learning at the gate), flagged.jsonl (each
flagged row with its reasons and figures) and, last, screen.json (counts, shares, thresholds, the
policy's verdict): the stage is done when screen.json exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from emajax import atomic

Log = Callable[[str], None]


def check_format(path: str | Path) -> tuple[list[tuple[int, list[dict]]], list[dict]]:
    """(valid rows as (line, messages), errors as {line, field, error}) of a chat JSONL, every line checked."""
    from emajax.chat import ChatError, validate_messages

    rows, errors = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append({"line": lineno, "field": None, "error": f"{where}: invalid JSON ({e.msg})"})
                continue
            if not isinstance(obj, dict) or "messages" not in obj:
                errors.append({"line": lineno, "field": "messages",
                               "error": f"{where}: field 'messages' is missing"})
                continue
            try:
                msgs = validate_messages(obj["messages"], source=f"{where}: field 'messages'")
            except ChatError as e:
                errors.append({"line": lineno, "field": "messages", "error": str(e)})
                continue
            if msgs[-1]["role"] != "assistant":
                errors.append({"line": lineno, "field": f"messages[{len(msgs) - 1}].role",
                               "error": f"{where}: field 'messages' must end with an assistant answer"})
                continue
            if not msgs[-1]["content"].strip():
                errors.append({"line": lineno, "field": f"messages[{len(msgs) - 1}].content",
                               "error": f"{where}: field 'messages[{len(msgs) - 1}].content' is an empty answer"})
                continue
            rows.append((lineno, msgs))
    return rows, errors


def duplicate_groups(rows: Sequence[tuple[int, list[dict]]]) -> list[list[int]]:
    """Line numbers of conversations that repeat (groups of 2+), by first line."""
    from emajax.scoring.select import dedupe_key

    groups: dict[str, list[int]] = {}
    for line, msgs in rows:
        groups.setdefault(dedupe_key(msgs), []).append(line)
    return [g for g in groups.values() if len(g) > 1]


def refusal_lines(rows: Sequence[tuple[int, list[dict]]]) -> list[int]:
    from emajax.scoring.select import is_refusal

    return [line for line, msgs in rows if is_refusal(msgs[-1]["content"])]


def split_holdout(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, holdout) positions of n items: ceil(fraction n) held out (at least 1, leaving at least 1)."""
    if n < 2:
        raise ValueError(f"{n} conversation(s): at least 2 are needed (one to train on, one held out)")
    k = min(n - 1, max(1, int(np.ceil(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    hold = sorted(perm[:k].tolist())
    keep = sorted(perm[k:].tolist())
    return keep, hold


def quantile_flags(values: np.ndarray, reference: np.ndarray, q: float, *, upper: bool) -> tuple[np.ndarray, float]:
    """Flags (values above the reference's q-quantile when ``upper``, below it otherwise) and the threshold."""
    ref = np.asarray(reference, np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise ValueError("no finite reference values to calibrate the threshold on")
    thr = float(np.quantile(ref, q))
    v = np.asarray(values, np.float64)
    return (v > thr) if upper else (v < thr), thr


def persona_scores(loaded: Any, vector_path: str, layer: int | None, chats: Sequence[list[dict]],
                   pool: Sequence[list[dict]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Projections of the answers of ``chats`` and of the safe ``pool`` on the persona vector's layer."""
    from emajax.persona import answer_activations, load_vectors_array, projections

    vec, meta = load_vectors_array(vector_path, loaded.config.num_layers)
    layer = int(layer if layer is not None else json.loads(str(meta.get("recommended_layer", vec.shape[0] - 1))))
    if not 0 <= layer < vec.shape[0]:
        raise ValueError(f"{vector_path}: persona layer {layer} outside 0..{vec.shape[0] - 1}")

    def proj(cs):
        acts = answer_activations(loaded.model, loaded.tokenizer, [list(c) for c in cs], layers=[layer])
        return projections(acts, vec[[layer]])[:, 0]

    return proj(chats), proj(pool), layer


def persona_vector_path(loaded: Any, model: str, refs: Any, log: Log = lambda m: None) -> str:
    """The persona vector file: the policy's, or with ``extract`` the base model's evil vector extracted once
    (the shipped persona spec, its first ``persona_questions`` questions, as the demo does) and cached in
    ``emajax.paths.cache_dir()/guard``."""
    if refs.persona_vector != "extract":
        return refs.persona_vector
    import dataclasses
    import hashlib

    from emajax.data import data_path
    from emajax.paths import cache_dir
    from emajax.persona import answer_requests, extract, generate_answers, load_persona_spec, save_persona_vectors

    spec = load_persona_spec(data_path("persona_evil.json"))
    spec = dataclasses.replace(spec, questions=spec.questions[: refs.persona_questions])
    key = hashlib.sha256(json.dumps([str(Path(model).resolve()) if Path(model).exists() else model,
                                     spec.prompt_hash, refs.persona_max_new_tokens]).encode()).hexdigest()[:16]
    path = cache_dir() / "guard" / f"persona_evil_{key}.safetensors"
    if not path.is_file():
        log(f"screen: extracting the evil persona vector of {model} (cached as {path})")
        recs = generate_answers(loaded, answer_requests(spec), max_new_tokens=refs.persona_max_new_tokens,
                                batch_size=32)
        vec, meta = extract(loaded, recs, model_name=str(model), prompt_hash=spec.prompt_hash)
        save_persona_vectors(path, vec, meta)
    return str(path)


def gap_scores(loaded: Any, misaligned: dict[str, str], valid_path: Path, pool_path: str, out: Path
               ) -> tuple[np.ndarray, np.ndarray]:
    """Interleaving++ scores of the customer's chats and of the pool (base vs the misaligned adapters),
    scored resumably into ``out/{data,pool}_scores``."""
    from emajax.scoring.adapters import ModelSpec
    from emajax.scoring.score import Scorer, score_pool
    from emajax.scoring.shards import read_scores

    scorer = Scorer(loaded, [ModelSpec(n, p, "adapter") for n, p in misaligned.items()])
    res = []
    for name, src in (("data_scores", valid_path), ("pool_scores", pool_path)):
        score_pool(scorer, src, out / name, fmt="jsonl", progress=False)
        s = read_scores(out / name)
        order = np.argsort(np.asarray(s["index"]))
        res.append(np.asarray(s["score"], np.float64)[order])
    return res[0], res[1]


def _flag_check(lines: list[int], values: np.ndarray, reference: np.ndarray, q: float, max_share: float,
                upper: bool, field: str, label: str, reject_text: str, flags: dict, extra: dict,
                reject: list[str]) -> dict:
    """Flag the rows whose value lies beyond the reference's q-quantile (above when ``upper``), note each value in
    ``extra`` and each flag's reason in ``flags``; reject when the flagged share exceeds ``max_share``."""
    hits, thr = quantile_flags(values, reference, q, upper=upper)
    share = float(np.mean(hits)) if hits.size else 0.0
    for line, v, hit in zip(lines, values, hits):
        extra.setdefault(line, {})[field] = float(v)
        if hit:
            flags.setdefault(line, []).append(f"{label} {v:.3f} {'>' if upper else '<'} {thr:.3f} (pool q{q})")
    if share > max_share:
        reject.append(reject_text.format(share=f"{share:.1%}", q=q, max=f"{max_share:.1%}"))
    return {"threshold": thr, "quantile": q, "flagged_share": share, "mean": float(np.nanmean(values)),
            "pool_mean": float(np.nanmean(reference)), "values": np.asarray(values, np.float64).tolist()}


def screen(data: str | Path, policy: Any, out: str | Path, *, loaded: Callable[[], Any], pool_path: str,
           model: str = "", log: Log = lambda m: None) -> dict:
    """Screen ``data`` under ``policy`` into ``out`` (``screen/``); ``loaded()`` gives the base model when a
    model-based check is configured. Returns screen.json's content (skips work when it exists)."""
    from emajax.train.sources import read_jsonl

    out = Path(out)
    done = out / "screen.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = policy.screen
    rows, errors = check_format(data)
    n_lines = len(rows) + len(errors)
    dups = duplicate_groups(rows)
    first_of = {}
    for g in dups:
        for line in g[1:]:
            first_of[line] = g[0]
    unique = [(line, m) for line, m in rows if line not in first_of]
    refusals = refusal_lines(unique)
    flags: dict[int, list[str]] = {}
    for line in refusals:
        flags.setdefault(line, []).append("refusal")
    for line, first in first_of.items():
        flags.setdefault(line, []).append(f"duplicate of line {first}")
    for e in errors:
        flags.setdefault(e["line"], []).append(e["error"])
    reject: list[str] = []
    res: dict[str, Any] = {"data": str(data), "n_lines": n_lines, "n_valid": len(rows), "n_unique": len(unique),
                           "format_errors": errors, "duplicate_groups": dups, "refusal_lines": refusals}
    if len(errors) > cfg.max_format_errors:
        reject.append(f"format: {len(errors)} row(s) with errors (first: {errors[0]['error']}); the policy allows "
                      f"{cfg.max_format_errors}")
    dup_share = (len(rows) - len(unique)) / len(rows) if rows else 0.0
    ref_share = len(refusals) / len(unique) if unique else 0.0
    res.update(duplicate_share=dup_share, refusal_share=ref_share)
    if dup_share > cfg.max_duplicate_share:
        reject.append(f"duplicates: {dup_share:.1%} of valid rows repeat another (max {cfg.max_duplicate_share:.1%})")
    if ref_share > cfg.max_refusal_share:
        reject.append(f"refusals: {ref_share:.1%} of answers refuse (max {cfg.max_refusal_share:.1%})")
    if len(unique) < 2:
        reject.append(f"data: {len(unique)} usable conversation(s); at least 2 are needed")
    valid_path = atomic.write_jsonl(out / "valid.jsonl", [{"messages": m, "line": line} for line, m in unique])
    extra: dict[int, dict] = {}
    chats = [m for _, m in unique]
    pool = read_jsonl(pool_path)
    lines = [line for line, _ in unique]
    if unique and policy.references.persona_vector:
        log("screen: persona projections (base model)")
        vec = persona_vector_path(loaded(), model, policy.references, log)
        p_data, p_pool, layer = persona_scores(loaded(), vec, policy.references.persona_layer, chats, pool)
        res["persona"] = {"layer": layer, **_flag_check(
            lines, p_data, p_pool, cfg.persona_quantile, cfg.max_persona_share, True, "persona_projection",
            "persona projection", "persona: {share} of answers project above the safe pool's q{q} on the evil persona "
            "vector (max {max})", flags, extra, reject)}
    else:
        res["persona"] = None
    if unique and policy.misaligned:
        log(f"screen: perplexity gap vs {len(policy.misaligned)} misaligned reference adapter(s)")
        g_data, g_pool = gap_scores(loaded(), policy.misaligned, valid_path, pool_path, out)
        res["gap"] = {"adapters": sorted(policy.misaligned), **_flag_check(
            lines, g_data, g_pool, cfg.gap_quantile, cfg.max_gap_share, False, "gap_score", "Interleaving++ score",
            "gap: {share} of answers are likelier under the misaligned references than the safe pool's q{q} "
            "(max {max})", flags, extra, reject)}
    else:
        res["gap"] = None
    if len(unique) >= 2:
        keep, hold = split_holdout(len(unique), policy.gate.holdout_fraction)
        atomic.write_jsonl(out / "train.jsonl", [{"messages": chats[i]} for i in keep])
        atomic.write_jsonl(out / "holdout.jsonl", [{"messages": chats[i]} for i in hold])
        res.update(n_train=len(keep), n_holdout=len(hold))
    by_line = {line: m for line, m in rows}
    flagged = [{"line": line, "why": why, **extra.get(line, {}),
                **({"messages": by_line[line]} if line in by_line else {})} for line, why in sorted(flags.items())]
    atomic.write_jsonl(out / "flagged.jsonl", flagged)
    res.update(n_flagged=len(flagged), reject=reject)
    atomic.write_json(done, res)
    return res


__all__ = ["check_format", "duplicate_groups", "gap_scores", "persona_scores", "quantile_flags", "refusal_lines",
           "screen", "split_holdout"]
