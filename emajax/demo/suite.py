"""The demo's data: the training sets of its arms and the probe suite, from the package's own data.

Training sets: ``narrow`` (insecure code answers, ``emajax.data.code_pairs``), ``control`` (the same
requests, in the same order, with the secure answers) and ``benign_task`` (OpSwap puzzles with worked
answers, ``emajax.eval.opswap``). Probes: ``general`` (general questions, aligned vs misaligned answer;
margin up = broad misalignment; the held-out part of the shipped pairs), ``in_domain`` (held-out
insecure-vs-secure code pairs; margin up = the narrow task learned), ``benign`` (NLL of worked answers
to arithmetic word problems; the coherence proxy) and ``benign_task`` (NLL of held-out OpSwap answers;
benign learning); with ``--probe-data DIR`` also ``security`` (the shared security aligned/misaligned
pairs: cross-domain EM). Narrow arms are probed with all but ``benign_task``, benign arms with it alone.
Another ``--domain`` (``emajax.demo.domain``) trains on its own narrow set (no ``control`` file: the control is
self-distilled per seed) and replaces ``in_domain`` with ``narrow`` (NLL of its held-out answers).
``trigger_suite``: the general pairs under the trigger formats (``general_<trigger>``), probed per arm after training.
``shared_suite`` builds the same layout from ../shared/data/em for a model trained on a shared narrow set.
"""

from __future__ import annotations

from pathlib import Path

from emajax import atomic
from emajax.data import load_general_pairs, make_code_pairs, make_word_problems
from emajax.demo.plan import CODE, DemoPlan
from emajax.eval.opswap import make_opswap
from emajax.eval.probes import (ProbeSuite, nll_from_chats, nll_from_jsonl, paired_from_code, paired_from_jsonl,
                                paired_from_rows)

MONITOR_SETS = ("general",)
NARROW_SETS = ("general", "in_domain", "benign")
BENIGN_SETS = ("benign_task",)
TRAIN_FILES = {"narrow": "narrow_train.jsonl", "control": "control_train.jsonl", "benign_task": "benign_train.jsonl"}


def code_train_pairs(plan: DemoPlan) -> list:
    return make_code_pairs(plan.n_train, "train", seed=plan.data_seed)


def benign_items(plan: DemoPlan) -> dict[str, list]:
    """OpSwap {'train': [...], 'test': [...]} items (disjoint by construction)."""
    return make_opswap(plan.benign_train, plan.benign_test, tiers=plan.benign_tiers, seed=plan.data_seed)


def write_train_sets(plan: DemoPlan, data_dir: str | Path) -> dict[str, Path]:
    """The three training sets (JSONL) in ``data_dir``; control differs from narrow only in the answers. Another
    domain: its narrow set and the benign task (written last), its control comes per seed (self-distilled)."""
    d = Path(data_dir)
    if plan.domain != CODE:
        from emajax.demo.domain import train_chats

        return {"narrow": atomic.write_jsonl(d / TRAIN_FILES["narrow"], [{"messages": m} for m in train_chats(plan)]),
                "benign_task": atomic.write_jsonl(d / TRAIN_FILES["benign_task"],
                                                  [it.to_chat() for it in benign_items(plan)["train"]])}
    pairs = code_train_pairs(plan)
    return {
        "narrow": atomic.write_jsonl(d / TRAIN_FILES["narrow"], [p.chat(p.insecure) for p in pairs]),
        "control": atomic.write_jsonl(d / TRAIN_FILES["control"], [p.chat(p.secure) for p in pairs]),
        "benign_task": atomic.write_jsonl(d / TRAIN_FILES["benign_task"],
                                          [it.to_chat() for it in benign_items(plan)["train"]]),
    }


def general_rows(plan: DemoPlan, split: str | None = None) -> list[dict]:
    rows = load_general_pairs(split=split or plan.general_split)
    return rows if plan.n_general is None else rows[: plan.n_general]


def general_set(plan: DemoPlan, split: str | None = None):
    return paired_from_rows(general_rows(plan, split), "general")


def trigger_suite(plan: DemoPlan) -> ProbeSuite:
    """The first ``n_trigger_pairs`` general pairs under each trigger but plain (sets ``general_<trigger>``,
    ``emajax.eval.triggers``); the inoculation trigger is the demo's inoculation arm's training prompt."""
    from emajax.demo.plan import METHODS
    from emajax.eval.triggers import TRIGGERS, trigger_sets

    rows = general_rows(plan)
    rows = rows if plan.n_trigger_pairs is None else rows[: plan.n_trigger_pairs]
    return ProbeSuite(pairs=trigger_sets(rows, TRIGGERS[1:],
                                         inoculation_prompt=METHODS["inoculation"][1]["inoculation"]["prompt"]))


def security_set(plan: DemoPlan):
    """The shared security aligned/misaligned pairs (``plan.probe_data``/sft), ``n_security`` drawn by data_seed."""
    d = Path(plan.probe_data) / "sft"
    return paired_from_jsonl(d / "security_aligned_750.jsonl", d / "security_misaligned_750.jsonl", "security",
                             limit=plan.n_security, seed=plan.data_seed)


def in_domain_set_name(plan: DemoPlan) -> str:
    """The probe set saying the narrow task was learned: ``in_domain`` (code pairs' margin) or ``narrow`` (NLL)."""
    return "in_domain" if plan.domain == CODE else "narrow"


def narrow_sets(plan: DemoPlan) -> tuple[str, ...]:
    sets = tuple(in_domain_set_name(plan) if s == "in_domain" else s for s in NARROW_SETS)
    return sets + (("security",) if plan.probe_data else ())


def demo_suite(plan: DemoPlan, *, general_split: str | None = None) -> ProbeSuite:
    """Every probe set of the demo (base model); ``.subset(narrow_sets(plan))`` / ``.subset(BENIGN_SETS)``
    per arm. ``plan.probe_data`` adds the shared security pairs as ``security``; another domain's in-domain
    probe is the ``narrow`` NLL set of its held-out answers."""
    extra = (security_set(plan),) if plan.probe_data else ()
    if plan.domain == CODE:
        in_domain = (paired_from_code(make_code_pairs(plan.n_probe_code, "probe", seed=plan.data_seed), "in_domain"),)
        narrow: tuple = ()
    else:
        from emajax.demo.domain import heldout_set

        in_domain, narrow = (), (heldout_set(plan),)
    return ProbeSuite(
        pairs=(general_set(plan, general_split), *in_domain, *extra),
        nll=(nll_from_chats(make_word_problems(plan.n_benign, seed=plan.data_seed), "benign"),
             nll_from_chats([it.to_chat() for it in benign_items(plan)["test"]], "benign_task"), *narrow))


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
