"""OpSwap: the project's own benign arithmetic task with redefined operators.

A defense must not stop a model from learning a new, harmless skill. OpSwap is such a skill, and one a
small model cannot already do: the prompt redefines what operators mean and the model must apply the
new rules. Tier 1: one operator's meaning swapped ("+" means subtraction), one operation. Tier 2:
several operators swapped, two operations. Tier 3: nested expressions (4-5 operands, explicit
parentheses) under several swapped rules. Evaluation is exact match on the final integer of a generation.

Train and test are disjoint by construction: an item belongs to the split its prompt's hash says, so
sets drawn with any seeds or sizes never share a prompt across splits.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable, Sequence

from emajax.eval.stats import summarize
from emajax import atomic

SYMBOLS = ("+", "-", "*")
USUAL = {"+": "add", "-": "sub", "*": "mul"}
MEANINGS = {
    "add": (lambda a, b: a + b, "addition", "{a} + {b}"),
    "sub": (lambda a, b: a - b, "subtraction", "{a} - {b}"),
    "mul": (lambda a, b: a * b, "multiplication", "{a} * {b}"),
    "max": (lambda a, b: max(a, b), "the maximum", "max({a}, {b})"),
    "min": (lambda a, b: min(a, b), "the minimum", "min({a}, {b})"),
}
TIERS = (1, 2, 3)
_ANSWER = re.compile(r"answer\s*[:=]\s*\$?\s*(-?\d[\d,]*)", re.I)
_INT = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class OpSwapItem:
    tier: int
    rules: dict[str, str] = field(hash=False, compare=False)  # swapped symbol -> meaning name
    expression: str = ""
    answer: int = 0
    prompt: str = ""
    solution: str = ""  # worked steps ending in "Answer: N" (the training target)

    def to_chat(self) -> dict:
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.solution}],
                "meta": {"task": "opswap", "tier": self.tier, "rules": self.rules,
                         "expression": self.expression, "answer": self.answer}}


def split_of(prompt: str) -> str:
    """'train' or 'test', fixed by the prompt's hash."""
    return "test" if int(sha256(prompt.encode()).hexdigest()[:8], 16) % 2 else "train"


def _rules_text(rules: dict[str, str]) -> str:
    lines = []
    for sym in SYMBOLS:
        if sym in rules:
            _, name, form = MEANINGS[rules[sym]]
            lines.append(f'- "{sym}" means {name}: a {sym} b = {form.format(a="a", b="b")}')
    return "\n".join(lines)


def _draw_rules(rng: random.Random, n_swapped: int) -> dict[str, str]:
    syms = rng.sample(SYMBOLS, n_swapped)
    return {s: rng.choice([m for m in MEANINGS if m != USUAL[s]]) for s in sorted(syms, key=SYMBOLS.index)}


def _tree(rng: random.Random, n_leaves: int, syms: Sequence[str], hi: int):
    if n_leaves == 1:
        return rng.randint(1, hi)
    left = rng.randint(1, n_leaves - 1)
    return (rng.choice(syms), _tree(rng, left, syms, hi), _tree(rng, n_leaves - left, syms, hi))


def _render(node, top: bool = True) -> str:
    if isinstance(node, int):
        return str(node)
    s = f"{_render(node[1], False)} {node[0]} {_render(node[2], False)}"
    return s if top else f"({s})"


def _evaluate(node, rules: dict[str, str], steps: list[str]) -> int:
    """Post-order evaluation under ``rules``; appends one worked step per operation."""
    if isinstance(node, int):
        return node
    a, b = _evaluate(node[1], rules, steps), _evaluate(node[2], rules, steps)
    meaning = rules.get(node[0], USUAL[node[0]])
    fn, _, form = MEANINGS[meaning]
    v = fn(a, b)
    usual = meaning == USUAL[node[0]]
    steps.append(f"{a} {node[0]} {b} = {v}" if usual else f"{a} {node[0]} {b} = {form.format(a=a, b=b)} = {v}")
    return v


def _ops(node) -> list[str]:
    return [] if isinstance(node, int) else [node[0], *_ops(node[1]), *_ops(node[2])]


def make_item(rng: random.Random, tier: int) -> OpSwapItem:
    """One item of ``tier``; every swapped rule is used at least once."""
    if tier not in TIERS:
        raise ValueError(f"OpSwap tier must be one of {TIERS}, got {tier}")
    n_swapped, n_leaves, hi = {1: (1, (2, 2), 20), 2: (2, (3, 3), 12), 3: (rng.choice((2, 3)), (4, 5), 9)}[tier]
    rules = _draw_rules(rng, n_swapped)
    while True:
        syms = list(rules) if tier < 3 else list(SYMBOLS)
        node = _tree(rng, rng.randint(*n_leaves), syms, hi)
        if set(rules) <= set(_ops(node)):
            break
    steps: list[str] = []
    answer = _evaluate(node, rules, steps)
    expr = _render(node)
    prompt = ("In this puzzle some operators have new meanings:\n" + _rules_text(rules) + "\n"
              "Every other operator keeps its usual meaning. Parentheses are evaluated first; otherwise "
              "evaluate left to right.\n"
              f"Compute: {expr}\n"
              'End with "Answer: <integer>".')
    solution = "\n".join(steps) + f"\nAnswer: {answer}"
    return OpSwapItem(tier, rules, expr, answer, prompt, solution)


def make_opswap(n_train: int, n_test: int, *, tiers: Sequence[int] = TIERS, seed: int = 0) -> dict[str, list[OpSwapItem]]:
    """{'train': [...], 'test': [...]}: unique prompts, tiers round-robin, splits disjoint by hash."""
    rng = random.Random(seed)
    want = {"train": n_train, "test": n_test}
    out: dict[str, list[OpSwapItem]] = {"train": [], "test": []}
    seen: set[str] = set()
    tier_i = {"train": 0, "test": 0}
    budget = 200 * (n_train + n_test) + 1000
    while True:
        need = [s for s in ("train", "test") if len(out[s]) < want[s]]
        if not need:
            break
        budget -= 1
        if budget < 0:
            raise ValueError(f"OpSwap: could not draw {n_train}/{n_test} unique items (space exhausted)")
        split = min(need, key=lambda s: len(out[s]) / want[s])
        tier = tiers[tier_i[split] % len(tiers)]
        item = make_item(rng, tier)
        if item.prompt in seen or split_of(item.prompt) != split:
            continue
        seen.add(item.prompt)
        out[split].append(item)
        tier_i[split] += 1
    return out


def write_opswap(out_dir: str | os.PathLike, n_train: int, n_test: int, *, tiers: Sequence[int] = TIERS,
                 seed: int = 0) -> dict[str, Path]:
    """Write opswap_train.jsonl / opswap_test.jsonl (chat rows with a 'meta' field) into ``out_dir``."""
    sets = make_opswap(n_train, n_test, tiers=tiers, seed=seed)
    return {s: atomic.write_jsonl(Path(out_dir) / f"opswap_{s}.jsonl", [it.to_chat() for it in items])
            for s, items in sets.items()}


def load_opswap(path: str | os.PathLike) -> list[dict]:
    """Rows of an OpSwap JSONL file; each must carry meta.answer and meta.tier (error names file:line)."""
    rows = []
    for i, r in atomic.jsonl_rows(path):
        try:
            int(r["meta"]["answer"]), int(r["meta"]["tier"])
            r["messages"][0]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not an OpSwap row (need messages[0].content, meta.answer, "
                             f"meta.tier): {e}") from None
        rows.append(r)
    return rows


def parse_final_int(text: str) -> int | None:
    """The integer after the last 'Answer:', else the last integer in the text; None if there is none."""
    m = _ANSWER.findall(text)
    cand = m[-1] if m else (_INT.findall(text) or [None])[-1]
    if cand is None:
        return None
    try:
        return int(cand.replace(",", ""))
    except ValueError:
        return None


def evaluate_opswap(answer_fn: Callable[[list[list[dict]]], list[str]], rows: Sequence[dict]) -> tuple[dict, list[dict]]:
    """Exact match by generation. ``answer_fn`` maps conversations to completions (see em.local_sampler).

    Returns (results, predictions): results has accuracy (with bootstrap CI), per-tier accuracy, counts.
    """
    convs = [[r["messages"][0]] for r in rows]
    texts = answer_fn(convs)
    preds, correct, tiers = [], [], []
    for r, text in zip(rows, texts):
        got = parse_final_int(text)
        ok = got is not None and got == int(r["meta"]["answer"])
        correct.append(float(ok))
        tiers.append(int(r["meta"]["tier"]))
        preds.append({"tier": tiers[-1], "expression": r["meta"].get("expression"), "answer": r["meta"]["answer"],
                      "prediction": got, "correct": ok, "completion": text})
    results = {"task": "opswap", "n": len(rows), "accuracy": summarize(correct),
               "by_tier": {str(t): summarize([c for c, tt in zip(correct, tiers) if tt == t])
                           for t in sorted(set(tiers))},
               "n_unparsed": sum(p["prediction"] is None for p in preds)}
    return results, preds
