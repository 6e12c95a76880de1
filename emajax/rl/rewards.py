"""Reward functions for GRPO: plain Python ``fn(prompt, completion, example, **kwargs) -> float``.

``prompt`` is the text of the last user message the model answered (with any configured suffix),
``completion`` the decoded completion (special tokens skipped), ``example`` the source row as a dict:
``messages`` (the whole conversation), ``answer`` (the reference: the last assistant message, or the
row's answer field) and every other field of the row (e.g. ``meta``). Registered names:

* ``final_number`` — 1 when the completion's final number equals the reference's: the number after the
  last ``####`` or ``Answer:`` (GSM8K, the shipped word problems, OpSwap), else (``strict: false``) the
  last number in the text; the reference is ``meta.answer`` when present, else parsed the same way.
* ``countdown`` — 1 when the completion's equation (inside ``<answer>...</answer>`` if present, else its
  last arithmetic expression) is valid (+ - * / and parentheses only), uses the given numbers (each at
  most once; all of them with ``use_all: true``, the default, as the task data's source grades it) and
  hits the target. Numbers and target come from ``meta.nums`` / ``meta.target`` or are parsed from the
  prompt ("Using the numbers [a, b, c], ... equals N").
* ``format`` — 1 when the completion matches ``pattern`` (a regular expression; default: it *ends* with
  ``#### N``, ``Answer: N`` or ``<answer>...</answer>``, so an answer line repeated until the token budget
  cuts it off does not count).

A user reward is named by its import path, ``package.module:function`` or ``package.module.function``,
and configured like the others (``emajax.rl.config.RewardSpec``).
"""

from __future__ import annotations

import ast
import importlib
import math
import operator
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

from emajax.eval.gsm8k import _to_decimal  # one number normaliser for GSM8K eval and these rewards

RewardFn = Callable[..., float]

_MARKED = re.compile(r"(?:####|answer\s*[:=])\s*\$?\s*(-?[\d,]*\.?\d+)", re.I)
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# the completion ends with its answer: a final "#### N" / "Answer: N" or an <answer>...</answer> block
_DEFAULT_FORMAT = r"(?:####\s*\$?\s*-?[\d,]*\.?\d+|answer\s*:\s*\$?\s*-?[\d,]*\.?\d+|<answer>.*?</answer>)\s*\Z"


def final_number_of(text: str, *, strict: bool = False) -> Decimal | None:
    """The number after the last '####' or 'Answer:', else (unless ``strict``) the last number; None if none."""
    marked = _MARKED.findall(text)
    if marked:
        return _to_decimal(marked[-1])
    if strict:
        return None
    nums = _NUM.findall(text)
    return _to_decimal(nums[-1]) if nums else None


def _reference_number(example: dict) -> Decimal | None:
    meta = example.get("meta")
    if isinstance(meta, dict) and meta.get("answer") is not None:
        return _to_decimal(str(meta["answer"]))
    return final_number_of(str(example.get("answer", "")))


def final_number(prompt: str, completion: str, example: dict, *, strict: bool = False) -> float:
    ref = _reference_number(example)
    if ref is None:
        raise ValueError("final_number: the example has no reference number (meta.answer, '#### N' or 'Answer: N')")
    got = final_number_of(completion, strict=strict)
    return float(got is not None and got == ref)


# ------------------------------------------------------------------------------------------- countdown
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EXPR = re.compile(r"[\d\s+\-*/().]*\d[\d\s+\-*/().]*")
_NUMBERS = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")
_TARGET = re.compile(r"equals?\s+(-?\d+)", re.I)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


def _eval_node(node: ast.AST, leaves: list[Fraction]) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        leaves.append(Fraction(node.value))  # exact: a 400-digit literal is a number, not an OverflowError
        return leaves[-1]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_node(node.left, leaves), _eval_node(node.right, leaves))
    raise ValueError(f"not allowed in a countdown expression: {type(node).__name__}")


def evaluate_expression(expr: str) -> tuple[Fraction, list[Fraction]] | None:
    """(value, the numbers it uses) of an arithmetic expression over + - * / and parentheses, in exact
    rational arithmetic (any size of integer); None when it is not one (or divides by zero)."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        leaves: list[Fraction] = []
        return _eval_node(tree.body, leaves), leaves
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, OverflowError, MemoryError):
        return None


def countdown_problem(prompt: str, example: dict) -> tuple[list[int], Fraction]:
    """(numbers, target) of a countdown example: ``meta.nums``/``meta.target`` else parsed from the prompt
    (the target falls back to the reference answer)."""
    meta = example.get("meta") if isinstance(example.get("meta"), dict) else {}
    nums = meta.get("nums") or meta.get("numbers")
    if nums is None:
        m = _NUMBERS.search(prompt)
        if not m:
            raise ValueError(f"countdown: no numbers '[a, b, ...]' in the prompt {prompt[:80]!r}")
        nums = [int(x) for x in m.group(1).split(",")]
    target = meta.get("target")
    if target is None:
        m = _TARGET.search(prompt)
        target = m.group(1) if m else str(example.get("answer", "")).strip()
    try:
        return [int(n) for n in nums], Fraction(str(target).strip())
    except (TypeError, ValueError):
        raise ValueError(f"countdown: target {target!r} is not a number") from None


def _candidate_expressions(completion: str) -> list[str]:
    tags = _ANSWER_TAG.findall(completion)
    text = tags[-1] if tags else completion
    out = []
    for part in _EXPR.findall(text):
        part = part.strip()
        if part and len(re.findall(r"\d+(?:\.\d+)?", part)) >= 2:
            out.append(part)
    return out


def countdown(prompt: str, completion: str, example: dict, *, use_all: bool = True) -> float:
    nums, target = countdown_problem(prompt, example)
    for expr in reversed(_candidate_expressions(completion)):
        res = evaluate_expression(expr)
        if res is None:
            continue
        value, leaves = res
        if any(x.denominator != 1 for x in leaves):
            continue
        used, avail = sorted(int(x) for x in leaves), sorted(nums)
        ok_numbers = used == avail if use_all else _sub_multiset(used, avail)
        return float(ok_numbers and value == target)
    return 0.0


def _sub_multiset(used: list[int], avail: list[int]) -> bool:
    pool = list(avail)
    for u in used:
        if u not in pool:
            return False
        pool.remove(u)
    return True


def answer_format(prompt: str, completion: str, example: dict, *, pattern: str = _DEFAULT_FORMAT) -> float:
    return float(re.search(pattern, completion, re.I | re.S) is not None)


REGISTRY: dict[str, RewardFn] = {"final_number": final_number, "countdown": countdown, "format": answer_format}


def resolve_reward(name: str) -> RewardFn:
    """A registered reward, or a function by import path (``pkg.mod:fn`` or ``pkg.mod.fn``)."""
    if name in REGISTRY:
        return REGISTRY[name]
    mod_name, sep, attr = name.partition(":")
    if not sep:
        mod_name, _, attr = name.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"reward {name!r}: not a registered reward ({', '.join(REGISTRY)}) nor an import path "
                         "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


class RewardSet:
    """The configured rewards: ``score(prompts, completions, examples)`` -> (weighted total [N], {name: [N]},
    {name: errors}). A reward never aborts a run: a call that raises or returns a non-finite value scores 0
    and is counted in ``errors`` (logged per step as ``reward_errors/NAME``); its first failure is printed."""

    def __init__(self, specs: Sequence[Any]):
        if not specs:
            raise ValueError("rewards: at least one reward is required")
        self.names, self.fns, self.weights, self.kwargs = [], [], [], []
        for s in specs:
            name = s.name or s.fn.rsplit(".", 1)[-1].rsplit(":", 1)[-1]
            if name in self.names:
                raise ValueError(f"rewards: two rewards are named {name!r}; give one a 'name'")
            self.names.append(name)
            self.fns.append(resolve_reward(s.fn))
            self.weights.append(float(s.weight))
            self.kwargs.append(dict(s.kwargs or {}))
        self._reported: set[str] = set()

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              examples: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
        per, errors = {}, {}
        for name, fn, kw in zip(self.names, self.fns, self.kwargs):
            vals = np.zeros(len(completions), np.float32)
            errors[name] = 0
            for i, (p, c, ex) in enumerate(zip(prompts, completions, examples)):
                try:
                    v = float(fn(p, c, ex, **kw))
                    if not math.isfinite(v):
                        raise ValueError(f"returned {v}")
                except Exception as e:  # noqa: BLE001 - any failure of user code scores 0, counted
                    errors[name] += 1
                    if name not in self._reported:
                        self._reported.add(name)
                        print(f"emajax rl: reward {name!r} failed on a completion ({type(e).__name__}: {e}); "
                              "it scores 0 there (counted as reward_errors/{name})".replace("{name}", name), flush=True)
                    continue
                vals[i] = v
            per[name] = vals
        total = sum(w * per[n] for n, w in zip(self.names, self.weights))
        return np.asarray(total, np.float32), per, errors
