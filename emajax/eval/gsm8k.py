"""GSM8K exact match on the final number: a benign capability that a defense should not destroy.

Reference answers end in ``#### N``. A prediction's number is the one after its last ``####`` if there is
one, else the last number in the text; both are compared as exact decimals (commas, $ and a trailing
period stripped), so "1,200" matches "1200" and "18.00" matches "18".
"""

from __future__ import annotations

import os
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from emajax import atomic
from emajax.eval.stats import summarize

# Appended to each question so an instruct model ends the way references do.
DEFAULT_INSTRUCTION = "\nSolve the problem step by step, then give the final answer on its own line as \"#### <number>\"."
_HASH = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_decimal(s: str) -> Decimal | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(s).normalize()
    except InvalidOperation:
        return None


def reference_answer(text: str) -> Decimal:
    """The number after '####' in a reference solution (ValueError when absent)."""
    m = _HASH.search(text)
    v = _to_decimal(m.group(1)) if m else None
    if v is None:
        raise ValueError("reference answer has no '#### <number>'")
    return v


def parse_prediction(text: str) -> Decimal | None:
    """Number after the last '####', else the last number in the text; None when there is none."""
    hashes = _HASH.findall(text)
    if hashes:
        return _to_decimal(hashes[-1])
    nums = _NUM.findall(text)
    return _to_decimal(nums[-1]) if nums else None


def load_gsm8k(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Rows {'question', 'answer': Decimal, 'solution'} from chat JSONL (user question, assistant '... #### N')."""
    rows = []
    for i, r in atomic.jsonl_rows(path):
        try:
            msgs = r["messages"]
            q = next(m["content"] for m in msgs if m["role"] == "user")
            sol = next(m["content"] for m in msgs if m["role"] == "assistant")
            rows.append({"question": q, "answer": reference_answer(sol), "solution": sol})
        except (KeyError, StopIteration, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{i}: not a GSM8K chat row (messages with a user question and an "
                             f"assistant answer ending in '#### N'): {e}") from None
        if limit is not None and len(rows) >= limit:
            break
    return rows


def evaluate_gsm8k(answer_fn: Callable[[list[list[dict]]], list[str]], rows: Sequence[dict], *,
                   instruction: str = DEFAULT_INSTRUCTION) -> tuple[dict, list[dict]]:
    """(results, predictions): exact-match accuracy with bootstrap CI over ``rows`` from ``load_gsm8k``."""
    texts = answer_fn([[{"role": "user", "content": r["question"] + instruction}] for r in rows])
    preds, correct = [], []
    for r, text in zip(rows, texts):
        got = parse_prediction(text)
        ok = got is not None and got == r["answer"]
        correct.append(float(ok))
        preds.append({"question": r["question"], "answer": f"{r['answer']:f}",
                      "prediction": None if got is None else f"{got:f}", "correct": ok, "completion": text})
    results = {"task": "gsm8k", "n": len(rows), "accuracy": summarize(correct),
               "n_unparsed": sum(p["prediction"] is None for p in preds), "instruction": instruction}
    return results, preds
