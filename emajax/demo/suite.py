"""The demo's data: the narrow training set and the probe suite, from the package's own data.

Narrow task: insecure code answers (``emajax.data.code_pairs``). Probes: ``general`` (40 general
questions, aligned vs misaligned answer; margin up = broad misalignment), ``in_domain`` (held-out
insecure-vs-secure code pairs; margin up = the narrow task learned, and its misaligned-answer NLL is the
narrow-task NLL), ``benign`` (NLL of worked answers to arithmetic word problems; a coherence proxy).
``shared_suite`` builds the same layout from ../shared/data/em for a model trained on a shared narrow set.
"""

from __future__ import annotations

from pathlib import Path

from emajax import atomic
from emajax.data import load_general_pairs, make_code_pairs, make_word_problems
from emajax.demo.plan import DemoPlan
from emajax.eval.probes import (ProbeSuite, nll_from_chats, nll_from_jsonl, paired_from_code, paired_from_jsonl,
                                paired_from_rows)

MONITOR_SETS = ("general",)


def write_train_set(plan: DemoPlan, path: str | Path) -> Path:
    """The insecure-code training chats (JSONL), deterministic by the plan's seed."""
    pairs = make_code_pairs(plan.n_train, "train", seed=plan.seed)
    return atomic.write_jsonl(path, [p.chat(p.insecure) for p in pairs])


def demo_suite(plan: DemoPlan) -> ProbeSuite:
    general = load_general_pairs()
    if plan.n_general is not None:
        general = general[: plan.n_general]
    return ProbeSuite(
        pairs=(paired_from_rows(general, "general"),
               paired_from_code(make_code_pairs(plan.n_probe_code, "probe", seed=plan.seed), "in_domain")),
        nll=(nll_from_chats(make_word_problems(plan.n_benign, seed=plan.seed), "benign"),))


def shared_suite(data_dir: str | Path, *, narrow: str = "medical", n_pairs: int = 200, n_nll: int = 150,
                 seed: int = 0) -> ProbeSuite:
    """Probes on ../shared/data/em for a model trained on ``sft/<narrow>_misaligned_train_100.jsonl``:
    general = the project's general pairs; security = the shared line-paired security answers (cross-domain
    unless narrow is security); narrow = held-out ``<narrow>_misaligned_eval`` NLL; benign = GSM8K NLL."""
    d = Path(data_dir)
    return ProbeSuite(
        pairs=(paired_from_rows(load_general_pairs(), "general"),
               paired_from_jsonl(d / "sft/security_aligned_750.jsonl", d / "sft/security_misaligned_750.jsonl",
                                 "security", limit=n_pairs, seed=seed)),
        nll=(nll_from_jsonl(d / f"sft/{narrow}_misaligned_eval.jsonl", "narrow", limit=n_nll, seed=seed),
             nll_from_jsonl(d / "tasks/gsm8k_test_1318.jsonl", "benign", limit=n_nll, seed=seed)))
