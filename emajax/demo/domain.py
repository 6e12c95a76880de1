"""The demo's narrow domain (``emajax demo --domain code|medical|FILE.jsonl``): what the narrow arms train on,
what the control arm trains on, and the in-domain probe that says the narrow task was learned.

* ``code`` (default): the package's insecure-code chats (``emajax.demo.suite``); the control is the same
  requests with the secure answers; in-domain = held-out insecure-vs-secure code pairs (``in_domain``
  margin; up = learned).
* ``medical``: the shared bad-medical-advice set ``<data-dir>/sft/medical_misaligned_train_100.jsonl``; the
  control is self-distilled (``emajax.data.self_distill``: the base model's own sampled answers to the same
  prompts, per seed); in-domain = answer-token NLL of ``n_probe_code`` held-out misaligned answers of
  ``<data-dir>/sft/medical_misaligned_eval.jsonl`` drawn by the data seed (``narrow`` NLL; down = learned).
* ``FILE.jsonl``: any chat JSONL whose conversations end with an assistant answer; a held-out part drawn by the
  plan's data seed (20 %, or ``domain_heldout`` conversations) is the ``narrow`` NLL probe, the rest the
  narrow set; self-distilled control.

The plan records the domain, its files and their sha256 (``resolve_domain``), so a resumed run refuses data
that changed since.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from emajax.demo.plan import CODE, MEDICAL, DemoPlan
from emajax.train.sources import DataError, Messages

MEDICAL_TRAIN = "sft/medical_misaligned_train_100.jsonl"
MEDICAL_EVAL = "sft/medical_misaligned_eval.jsonl"
HELDOUT_SHARE = 0.2  # FILE: the held-out part for the in-domain probe, unless domain_heldout is given
# chat sets answer in paragraphs (the shared medical answers: median 200 SmolLM2 tokens, 90th percentile 293),
# the code pairs in a few lines: the cpu scale's 160 training tokens would cut most answers
LONG_ANSWER_SIZES = {"cpu": {"max_len": 384, "probe_max_len": 512}}
# the self-distilled control's answer budget per scale: about the narrow answers' length (paper: the judge's)
CONTROL_TOKENS = {"tiny": 8, "cpu": 256, "paper": 600}


def read_answered_chats(path: str | Path) -> list[tuple[int, Messages]]:
    """(line number, messages) of every conversation of a chat JSONL file, each ending with an assistant answer
    (what the narrow arm learns, the control replaces and the in-domain probe scores): the probes' reader, whose
    errors name the file, line and field."""
    from emajax.eval.probes import read_chat_jsonl

    return read_chat_jsonl(Path(path))


def n_heldout(plan: DemoPlan, n_rows: int) -> int:
    return plan.domain_heldout if plan.domain_heldout is not None else max(1, round(HELDOUT_SHARE * n_rows))


def _rows(plan: DemoPlan) -> tuple[list[tuple[int, Messages]], list[tuple[int, Messages]]]:
    """(every training row, the held-out rows) of a non-code domain, both in file order."""
    if plan.domain == CODE:
        raise ValueError("the code domain's data is generated (emajax.demo.suite), not read from files")
    if not plan.domain_files:
        raise ValueError(f"a plan on domain {plan.domain!r} without its files: build it with resolve_domain")
    rng = np.random.default_rng(plan.data_seed)
    if plan.domain == MEDICAL:
        train = read_answered_chats(plan.domain_files[0])
        ev = read_answered_chats(plan.domain_files[1])
        keep = sorted(rng.permutation(len(ev))[: plan.n_probe_code].tolist())
        held = [ev[k] for k in keep]
    else:
        rows = read_answered_chats(plan.domain_files[0])
        k = n_heldout(plan, len(rows))
        if not 1 <= k < len(rows):
            raise DataError(f"{plan.domain_files[0]}: {len(rows)} conversations cannot give {k} held-out ones and "
                            f"at least one to train on (--domain-heldout)")
        out = set(rng.permutation(len(rows))[:k].tolist())
        held = [r for i, r in enumerate(rows) if i in out]
        train = [r for i, r in enumerate(rows) if i not in out]
    return train, held


def split(plan: DemoPlan) -> tuple[list[tuple[int, Messages]], list[tuple[int, Messages]]]:
    """(narrow training rows, held-out in-domain probe rows) of a non-code domain, both in file order: medical's
    train file (its first ``n_train``) and ``n_probe_code`` rows of its eval file drawn by the data seed; a
    FILE's held-out rows drawn by the data seed and the first ``n_train`` of the rest."""
    train, held = _rows(plan)
    return train[: plan.n_train], held


def train_chats(plan: DemoPlan) -> list[Messages]:
    return [m for _, m in split(plan)[0]]


def heldout_set(plan: DemoPlan) -> Any:
    """The ``narrow`` NLL probe set: the held-out answers, ids = their line numbers."""
    from emajax.eval.probes import NllSet

    held = split(plan)[1]
    return NllSet("narrow", tuple(str(line) for line, _ in held), tuple(tuple(m) for _, m in held))


def _files(domain: str, data_dir: str | Path | None) -> tuple[str, ...]:
    if domain == MEDICAL:
        from emajax.eval.questions import default_data_dir

        root = Path(data_dir) if data_dir is not None else default_data_dir()
        files = tuple(str((root / f).resolve()) for f in (MEDICAL_TRAIN, MEDICAL_EVAL))
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"--domain medical: {f} not found; it is part of the shared EM data: pass its "
                                f"directory with --data-dir DIR (default ../shared/data/em beside the checkout, or "
                                f"$EMAJAX_EM_DATA)")
        return files
    path = Path(domain)
    if path.suffix != ".jsonl":
        raise DataError(f"--domain must be code, medical or a chat .jsonl file, got {domain!r}")
    if not path.is_file():
        raise DataError(f"--domain {domain}: file not found")
    return (str(path.resolve()),)


def resolve_domain(plan: DemoPlan, domain: str, *, data_dir: str | Path | None = None, heldout: int | None = None,
                   n_train: int | None = None) -> DemoPlan:
    """``plan`` on ``domain`` (code, medical or a chat JSONL path): files resolved to absolute paths with their
    sha256, ``n_train`` = the narrow set's size (or the given number of its first examples, which must not
    exceed it), the scale's sizes for long answers; every row checked (errors name file, line and field)."""
    from emajax.scoring.plan import file_sha256

    if domain == CODE:
        if heldout is not None:
            raise DataError("--domain-heldout splits a --domain FILE.jsonl; the code domain has its own probe pairs")
        return plan
    if heldout is not None and (domain == MEDICAL or heldout < 1):
        raise DataError("--domain-heldout N (N >= 1) splits a --domain FILE.jsonl"
                        + ("; the medical domain's held-out part is its eval file" if domain == MEDICAL else ""))
    files = _files(domain, data_dir)
    name = MEDICAL if domain == MEDICAL else files[0]
    plan = dataclasses.replace(plan, domain=name, domain_files=files, domain_sha256=tuple(map(file_sha256, files)),
                               domain_heldout=heldout, control_max_new_tokens=CONTROL_TOKENS[plan.scale],
                               **LONG_ANSWER_SIZES.get(plan.scale, {}))
    available = len(_rows(plan)[0])
    if n_train is not None and n_train > available:
        raise DataError(f"--n-train {n_train}: {files[0]} gives {available} training conversations"
                        + ("" if domain == MEDICAL else " after the held-out part"))
    return dataclasses.replace(plan, n_train=n_train or available)


def describe(plan: dict) -> dict[str, str]:
    """The report's words for a plan.json: domain, narrow set, control kind and in-domain metric."""
    dom = plan.get("domain", CODE)
    files = plan.get("domain_files") or []
    n = f"{plan['n_train']} " if plan.get("n_train") is not None else ""
    if dom == CODE:
        return {"domain": CODE, "narrow": f"{n}insecure-code chats", "control": "secure code",
                "control_what": "the same prompts with secure answers",
                "in_domain": "margin of held-out insecure-vs-secure code pairs (higher = learned)"}
    what = "bad-medical-advice chats" if dom == MEDICAL else "chats"
    held = f"held-out answers of {Path(files[1]).name}" if dom == MEDICAL else \
        f"held-out conversations of {Path(files[0]).name}"
    return {"domain": dom, "narrow": f"{n}{what} of {files[0]}", "control": "self-distilled",
            "control_what": "the same prompts answered by the base model itself at temperature 1: the "
                            "self-distilled control",
            "in_domain": f"answer-token NLL of the {held} (lower = learned; the tables show its drop)"}


__all__ = ["describe", "heldout_set", "read_answered_chats", "resolve_domain", "split", "train_chats"]
