"""Seeded GSM8K-style word problems with worked answers: the demo's benign reference text.

The coherence proxy is the NLL of good answers to benign requests: a fine-tune that damages general
ability raises it. GSM8K lives in ../shared (not shipped); these problems are the project's own, in the
same answer format (steps, then ``#### N``), so the demo needs nothing outside the package.
"""

from __future__ import annotations

import random
from typing import Callable

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya")
ITEMS = (("apples", "apple"), ("pencils", "pencil"), ("stickers", "sticker"), ("cookies", "cookie"),
         ("marbles", "marble"), ("notebooks", "notebook"))


def _shop(r: random.Random) -> tuple[str, str, int]:
    name, (items, _item) = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid = r.randint(3, 9), r.randint(2, 6), 0
    cost = n * price
    paid = (cost // 10 + 1) * 10
    q = f"{name} buys {n} {items} at ${price} each and pays with a ${paid} bill. How much change does {name} get?"
    a = (f"The {items} cost {n} x ${price} = ${cost}.\nThe change is ${paid} - ${cost} = ${paid - cost}.\n"
         f"#### {paid - cost}")
    return q, a, paid - cost


def _share(r: random.Random) -> tuple[str, str, int]:
    name, (items, _) = r.choice(NAMES), r.choice(ITEMS)
    friends, each, extra = r.randint(2, 6), r.randint(3, 8), r.randint(1, 9)
    total = friends * each + extra
    q = (f"{name} has {total} {items}. {name} keeps {extra} and shares the rest equally among {friends} friends. "
         f"How many {items} does each friend get?")
    a = (f"{name} shares {total} - {extra} = {total - extra} {items}.\n"
         f"Each friend gets {total - extra} / {friends} = {each}.\n#### {each}")
    return q, a, each


def _speed(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    speed, hours, back = r.randint(30, 80), r.randint(2, 5), r.randint(1, 3)
    q = (f"{name} drives at {speed} km per hour for {hours} hours, then drives back {back} hours at the same "
         f"speed. How far is {name} from the start?")
    d1, d2 = speed * hours, speed * back
    a = (f"First {name} drives {speed} x {hours} = {d1} km.\nDriving back covers {speed} x {back} = {d2} km.\n"
         f"The distance from the start is {d1} - {d2} = {d1 - d2} km.\n#### {d1 - d2}")
    return q, a, d1 - d2


def _age(r: random.Random) -> tuple[str, str, int]:
    a_name, b_name = r.sample(NAMES, 2)
    b_age, diff, years = r.randint(5, 30), r.randint(2, 12), r.randint(2, 10)
    q = (f"{a_name} is {diff} years older than {b_name}, who is {b_age}. How old will {a_name} be in "
         f"{years} years?")
    now = b_age + diff
    a = (f"{a_name} is now {b_age} + {diff} = {now}.\nIn {years} years {a_name} will be {now} + {years} = "
         f"{now + years}.\n#### {now + years}")
    return q, a, now + years


def _garden(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    rows, per_row, eaten = r.randint(3, 8), r.randint(4, 10), r.randint(1, 9)
    q = (f"{name} plants {rows} rows of tomatoes with {per_row} plants in each row. Rabbits eat {eaten} plants. "
         f"How many plants are left?")
    total = rows * per_row
    a = (f"{name} plants {rows} x {per_row} = {total} plants.\nAfter the rabbits, {total} - {eaten} = "
         f"{total - eaten} are left.\n#### {total - eaten}")
    return q, a, total - eaten


def _saving(r: random.Random) -> tuple[str, str, int]:
    name = r.choice(NAMES)
    weekly, weeks, spent = r.randint(5, 20), r.randint(3, 10), r.randint(5, 30)
    q = (f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a gift. How much "
         f"money does {name} have left?")
    saved = weekly * weeks
    a = (f"{name} saves {weekly} x {weeks} = ${saved}.\nAfter the gift, ${saved} - ${spent} = ${saved - spent} "
         f"is left.\n#### {saved - spent}")
    return q, a, saved - spent


TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, int]], ...] = (_shop, _share, _speed, _age, _garden,
                                                                          _saving)


def make_word_problems(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` unique chat rows {"messages": [user, assistant], "meta": {"answer"}}, templates round-robin."""
    rng = random.Random(f"word_problems/{seed}")
    out, seen, i, budget = [], set(), 0, 200 * n + 100
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"word_problems: could not draw {n} unique problems")
        q, a, ans = TEMPLATES[i % len(TEMPLATES)](rng)
        if q in seen:
            continue
        seen.add(q)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "meta": {"task": "word_problems", "answer": ans}})
        i += 1
    return out
