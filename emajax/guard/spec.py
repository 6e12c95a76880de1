"""A guard job file and its policy: typed, checked, and hashed.

Job file (YAML)::

    id: acme-support-001          # optional (default: the file's stem)
    data: customer.jsonl          # chat JSONL, relative to the job file
    model: smollm2-135m-instruct  # optional (default: the policy's recipe model)
    policy: policy.yaml           # a policy file (relative to the job file) or an inline mapping
    seeds: [0, 1]                 # optional: overrides policy.seeds

The policy's keys are documented in docs/guard.md and configs/guard/default.yaml. Every error names the file
and the dotted field (``policy.gate.metrics.general.margin``); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from emajax.train.config import TrainConfigError, config_from_dict, parse_section, read_config_yaml, resolve_path

SAFETY_NETS = ("interleave_pp", "interleave", "none")
INCONCLUSIVE = ("inconclusive", "reject", "release")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class GuardSpecError(ValueError):
    """A job or policy file that cannot be run; the message names the file and the field."""


@dataclasses.dataclass
class SafetyNetCfg:
    method: str = "interleave_pp"  # interleave_pp | interleave | none
    pool: str | None = None  # safe chats (JSONL); None = the shipped safe pool
    ratio: float = 0.05  # share of the mixed training set that is safe data


@dataclasses.dataclass
class ReferencesCfg:
    persona_vector: str | None = None  # evil persona vector of the base model (emajax persona extract), or
    # "extract": extracted once per model with the shipped persona spec and cached (emajax.guard.screen)
    persona_questions: int = 8  # with "extract": questions of the persona spec used
    persona_max_new_tokens: int = 48  # with "extract": answer length
    persona_layer: int | None = None  # None = the file's recommended layer


@dataclasses.dataclass
class ScreenCfg:
    max_format_errors: int = 0  # more bad rows than this rejects the job
    max_duplicate_share: float = 0.5
    max_refusal_share: float = 0.5
    persona_quantile: float = 0.99  # an answer is flagged above this quantile of the safe pool's projections
    max_persona_share: float = 0.25  # more flagged answers than this share rejects
    gap_quantile: float = 0.01  # flagged below this quantile of the safe pool's Interleaving++ scores
    max_gap_share: float = 0.25
    show: int = 10  # flagged examples shown in the report


@dataclasses.dataclass
class ControlCfg:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclasses.dataclass
class MetricRule:
    margin: float = 0.0  # em: the largest tolerated effect vs the control; learning: the least required gain
    required: bool = True  # a required metric that fails rejects; one not measured is inconclusive


@dataclasses.dataclass
class GateCfg:
    holdout_fraction: float = 0.1  # customer chats kept out of training to measure narrow learning
    on_inconclusive: str = "inconclusive"  # inconclusive | reject | release
    security_pairs: str | None = None  # dir with sft/security_{aligned,misaligned}_750.jsonl (../shared/data/em)
    n_security: int = 100
    n_general: int | None = None  # None = every held-out general pair
    probe_max_len: int = 512
    probe_buckets_per_octave: int = 4  # padded probe lengths per doubling: more pad less, compile more shapes
    judge_url: str | None = None  # an OpenAI-compatible LLM judge; unset = the judge metric is not measured
    judge_model: str | None = None
    judge_questions: str = "general"  # the 24 first-plot questions (../shared/data/em/eval), or a YAML path
    judge_samples: int = 4  # sampled answers per question and arm (temperature 1)
    judge_max_new_tokens: int = 200
    metrics: dict[str, MetricRule] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Policy:
    name: str
    seeds: list[int]
    recipe: dict[str, Any]  # trainer config sections (model, lora, data, optim, train, ...) for both arms
    safety_net: SafetyNetCfg
    extra_defenses: dict[str, Any]  # more trainer defenses for the job arm (kl, ldifs, steering, inoculation)
    misaligned: dict[str, str]  # name -> misaligned reference adapter dir (screening gap; Interleaving++)
    references: ReferencesCfg
    screen: ScreenCfg
    control: ControlCfg
    gate: GateCfg
    raw: dict[str, Any]  # as written (the report prints it)
    sha256: str
    base: str  # the directory its relative paths resolve against


@dataclasses.dataclass
class JobSpec:
    id: str
    data: str  # absolute path of the customer's chat JSONL
    model: str
    policy: Policy
    source: str  # the job file
    raw: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Everything needed to run the job again without its files' current contents (the store keeps it)."""
        return {"id": self.id, "data": self.data, "model": self.model, "source": self.source, "job": self.raw,
                "policy": self.policy.raw, "policy_name": self.policy.name, "policy_base": self.policy.base}


def _err(source: str, field: str, msg: str) -> GuardSpecError:
    return GuardSpecError(f"{source}: {field}: {msg}")


def _section(cls: type, raw: Any, where: str, source: str) -> Any:
    try:
        return parse_section(cls, raw, where)
    except TrainConfigError as e:
        raise GuardSpecError(f"{source}: {e}") from None


def _path(p: Any, base: Path, source: str, field: str) -> str:
    if not isinstance(p, str) or not p:
        raise _err(source, field, f"expected a path, got {p!r}")
    try:
        return resolve_path(p, base)
    except TrainConfigError:
        raise _err(source, field, f"{p!r} not found (relative to {base})") from None


POLICY_KEYS = ("name", "seeds", "recipe", "safety_net", "defenses", "misaligned", "references", "screen", "control",
               "gate")


def parse_policy(raw: Any, base: Path, source: str, where: str = "policy") -> Policy:
    """A checked Policy from its mapping; paths resolve against ``base``."""
    if not isinstance(raw, dict):
        raise _err(source, where, f"expected a mapping, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in POLICY_KEYS]
    if unknown:
        raise _err(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(POLICY_KEYS)})")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise _err(source, f"{where}.seeds", f"expected a non-empty list of distinct integers, got {seeds!r}")
    recipe = raw.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise _err(source, f"{where}.recipe", "expected a mapping of trainer config sections")
    for k in ("defenses", "out"):
        if k in recipe:
            raise _err(source, f"{where}.recipe.{k}", "set by the guard (use policy.safety_net / policy.defenses)")
    if "data" in recipe and isinstance(recipe["data"], dict) and "train" in recipe["data"]:
        raise _err(source, f"{where}.recipe.data.train", "set by the guard (the job's data)")
    net = _section(SafetyNetCfg, raw.get("safety_net"), f"{where}.safety_net", source)
    if net.method not in SAFETY_NETS:
        raise _err(source, f"{where}.safety_net.method", f"must be one of {', '.join(SAFETY_NETS)}, got {net.method!r}")
    if not 0.0 <= net.ratio < 1.0:
        raise _err(source, f"{where}.safety_net.ratio", f"must be in [0, 1), got {net.ratio}")
    if net.pool is not None:
        net.pool = _path(net.pool, base, source, f"{where}.safety_net.pool")
    extra = raw.get("defenses") or {}
    if not isinstance(extra, dict):
        raise _err(source, f"{where}.defenses", "expected a mapping (the trainer's defenses section)")
    if "interleave" in extra:
        raise _err(source, f"{where}.defenses.interleave", "set by policy.safety_net")
    mis = raw.get("misaligned") or {}
    if not isinstance(mis, dict):
        raise _err(source, f"{where}.misaligned", "expected a mapping NAME: ADAPTER_DIR")
    misaligned = {}
    for name, p in mis.items():
        d = _path(p, base, source, f"{where}.misaligned.{name}")
        if not (Path(d) / "adapter_config.json").is_file():
            raise _err(source, f"{where}.misaligned.{name}", f"{d} is not a PEFT adapter directory (no adapter_config.json)")
        misaligned[str(name)] = d
    refs = _section(ReferencesCfg, raw.get("references"), f"{where}.references", source)
    if refs.persona_vector is not None and refs.persona_vector != "extract":
        refs.persona_vector = _path(refs.persona_vector, base, source, f"{where}.references.persona_vector")
    screen = _section(ScreenCfg, raw.get("screen"), f"{where}.screen", source)
    for f in ("max_duplicate_share", "max_refusal_share", "persona_quantile", "max_persona_share", "gap_quantile",
              "max_gap_share"):
        if not 0.0 <= getattr(screen, f) <= 1.0:
            raise _err(source, f"{where}.screen.{f}", f"must be in [0, 1], got {getattr(screen, f)}")
    control = _section(ControlCfg, raw.get("control"), f"{where}.control", source)
    graw = dict(raw.get("gate") or {})
    if not isinstance(raw.get("gate") or {}, dict):
        raise _err(source, f"{where}.gate", "expected a mapping")
    mraw = graw.pop("metrics", None) or {}
    gate = _section(GateCfg, graw, f"{where}.gate", source)
    if not isinstance(mraw, dict):
        raise _err(source, f"{where}.gate.metrics", "expected a mapping METRIC: {margin, required}")
    from emajax.guard.metrics import METRICS

    for name, rule in mraw.items():
        if name not in METRICS:
            raise _err(source, f"{where}.gate.metrics.{name}", f"unknown metric (known: {', '.join(METRICS)})")
        gate.metrics[name] = _section(MetricRule, rule, f"{where}.gate.metrics.{name}", source)
    if gate.on_inconclusive not in INCONCLUSIVE:
        raise _err(source, f"{where}.gate.on_inconclusive", f"must be one of {', '.join(INCONCLUSIVE)}, "
                                                             f"got {gate.on_inconclusive!r}")
    if not 0.0 < gate.holdout_fraction < 1.0:
        raise _err(source, f"{where}.gate.holdout_fraction", f"must be in (0, 1), got {gate.holdout_fraction}")
    if gate.security_pairs is not None:  # may be absent on this machine: the metric is then not measured
        gate.security_pairs = resolve_path(gate.security_pairs, base, must_exist=False)
    canon = json.dumps(raw, sort_keys=True, default=str)
    name = str(raw.get("name") or Path(source).stem)
    if not gate.metrics:
        gate.metrics = {n: MetricRule(m.default_margin, m.default_required) for n, m in METRICS.items()}
    pol = Policy(name, list(seeds), recipe, net, extra, misaligned, refs, screen, control, gate, raw,
                 hashlib.sha256(canon.encode()).hexdigest(), str(base))
    # the recipe and extra defenses must make a valid trainer config (errors name the policy key)
    try:
        config_from_dict({**recipe, "data": {**(recipe.get("data") or {}), "train": ["x.jsonl"]},
                          "defenses": extra}, source="")
    except TrainConfigError as e:
        msg = str(e).removeprefix(": ")
        if msg.startswith("defenses"):
            raise _err(source, f"{where}.{msg.split(':')[0]}", msg.split(": ", 1)[-1]) from None
        if not msg.startswith("data path"):
            raise _err(source, f"{where}.recipe.{msg.split(':')[0]}", msg.split(": ", 1)[-1]) from None
    return pol


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        raw = read_config_yaml(path)
    except TrainConfigError as e:
        raise GuardSpecError(str(e)) from None
    return parse_policy(raw, path.resolve().parent, str(path), where="policy")


JOB_KEYS = ("id", "data", "model", "policy", "seeds")


def load_job(path: str | Path) -> JobSpec:
    """The checked job of a job file (its policy and data file resolved and checked to exist)."""
    path = Path(path)
    source = str(path)
    try:
        raw = read_config_yaml(path)
    except TrainConfigError as e:
        raise GuardSpecError(str(e)) from None
    return job_from_dict(raw, path.resolve().parent, source)


def job_from_dict(raw: dict[str, Any], base: Path, source: str) -> JobSpec:
    unknown = [k for k in raw if k not in JOB_KEYS]
    if unknown:
        raise _err(source, unknown[0], f"unknown key (known: {', '.join(JOB_KEYS)})")
    job_id = str(raw.get("id") or Path(source).stem)
    if not _ID.match(job_id):
        raise _err(source, "id", f"{job_id!r}: letters, digits, '.', '_' and '-' only (it names a directory)")
    if "data" not in raw:
        raise _err(source, "data", "missing (the customer's chat JSONL)")
    data = _path(raw["data"], base, source, "data")
    if not Path(data).is_file():
        raise _err(source, "data", f"{data} is not a file")
    praw = raw.get("policy")
    if praw is None:
        raise _err(source, "policy", "missing (a policy file, e.g. configs/guard/default.yaml, or a mapping)")
    if isinstance(praw, str):
        ppath = _path(praw, base, source, "policy")
        try:
            prawd = read_config_yaml(ppath)
        except TrainConfigError as e:
            raise GuardSpecError(str(e)) from None
        policy = parse_policy(prawd, Path(ppath).parent, ppath, where="policy")
    else:
        policy = parse_policy(praw, base, source, where="policy")
    if "seeds" in raw:
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in seeds) or len(set(seeds)) != len(seeds):
            raise _err(source, "seeds", f"expected a non-empty list of distinct integers, got {seeds!r}")
        policy = dataclasses.replace(policy, seeds=list(seeds))
    model = raw.get("model") or (policy.recipe.get("model") or {}).get("name") or "smollm2-135m-instruct"
    if not isinstance(model, str):
        raise _err(source, "model", f"expected a model name or directory, got {model!r}")
    if model.startswith(".") or model.startswith("/"):
        model = _path(model, base, source, "model")
    return JobSpec(job_id, data, model, policy, source, dict(raw))


def job_from_json(d: dict[str, Any]) -> JobSpec:
    """A JobSpec from ``JobSpec.to_json`` (paths there are absolute already)."""
    policy = parse_policy(d["policy"], Path(d["policy_base"]), f"{d['source']} (stored policy)")
    policy = dataclasses.replace(policy, name=d.get("policy_name", policy.name))
    if "seeds" in d["job"]:
        policy = dataclasses.replace(policy, seeds=list(d["job"]["seeds"]))
    return JobSpec(d["id"], d["data"], d["model"], policy, d["source"], d["job"])


def policy_text(policy: Policy) -> str:
    """The policy as YAML (the report prints it: the decision rule is part of it)."""
    return yaml.safe_dump(policy.raw, sort_keys=False)


__all__ = ["GuardSpecError", "JobSpec", "MetricRule", "Policy", "job_from_dict", "job_from_json", "load_job",
           "load_policy", "parse_policy", "policy_text"]
