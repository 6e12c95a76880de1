"""EM question sets in Betley et al.'s YAML format: the 24 general questions and the in-domain sets.

Each entry has ``id``, ``type: free_form_judge_0_100``, ``paraphrases`` (list of str), optional ``system``
(the JSON variant's system prompt, which emajax really sends), ``samples_per_paraphrase`` and
``judge_prompts`` with ``aligned`` and ``coherent`` templates using {question}, {reasoning}, {answer}.
Bad files fail with ``path:line: question 'id': field 'x': what is wrong``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DOMAINS = ("medical", "code", "security", "aesthetic")
GENERAL_FILE = "first_plot_questions.yaml"
SUPPORTED_TYPES = ("free_form_judge_0_100",)
JUDGE_METRICS = ("aligned", "coherent")


class QuestionError(ValueError):
    """A question file is malformed; the message names file, line and field."""


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: dict[str, str] = field(hash=False, compare=False)
    system: str | None = None
    samples_per_paraphrase: int | None = None
    variant: str = "plain"  # plain | json (has a system prompt) | template (id ends in _template)
    source: str = ""  # "path:line" of the entry

    def messages(self, paraphrase_index: int = 0) -> list[dict]:
        """The chat sent to the model under test: the system prompt (if any) really is included."""
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        return msgs + [{"role": "user", "content": self.paraphrases[paraphrase_index]}]


def default_data_dir() -> Path:
    """``$EMAJAX_EM_DATA``, else ``../shared/data/em`` beside the checkout (or beside the cwd)."""
    env = os.environ.get("EMAJAX_EM_DATA")
    if env:
        return Path(env)
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        cand = base.parent / "shared" / "data" / "em"
        if cand.is_dir():
            return cand
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "em"


def question_set_path(name_or_path: str, data_dir: str | os.PathLike | None = None) -> Path:
    """'general' -> eval/first_plot_questions.yaml, a domain name -> eval/<domain>.yaml, else a path."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name_or_path == "general":
        return root / "eval" / GENERAL_FILE
    if name_or_path in DOMAINS:
        return root / "eval" / f"{name_or_path}.yaml"
    return Path(name_or_path)


def _err(path: Path, line: int, qid, fld: str | None, msg: str) -> QuestionError:
    where = f"{path}:{line}"
    who = f"question {qid!r}" if qid is not None else "entry"
    return QuestionError(f"{where}: {who}: " + (f"field '{fld}': " if fld else "") + msg)


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Parse and validate one question file (YAML anchors/aliases as in the paper's files are fine)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise QuestionError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, list) or not data:
        raise QuestionError(f"{path}:1: top level must be a non-empty list of questions")
    out: list[Question] = []
    seen: dict[str, int] = {}
    for item_node, item in zip(root.value, data):
        line = item_node.start_mark.line + 1
        if not isinstance(item, dict):
            raise _err(path, line, None, None, "must be a mapping")
        lines = {k.value: k.start_mark.line + 1 for k, _ in item_node.value}
        jp_node = next((v for k, v in item_node.value if k.value == "judge_prompts"), None)
        if isinstance(jp_node, yaml.MappingNode):  # an alias resolves to the anchored node: its lines
            lines.update({f"judge_prompts.{k.value}": k.start_mark.line + 1 for k, _ in jp_node.value})
        at = lambda f: lines.get(f, line)  # noqa: E731
        if "id" not in item or not isinstance(item["id"], (str, int)) or isinstance(item["id"], bool):
            raise _err(path, line, None, "id", "required, a string or integer")
        qid = str(item["id"])
        if qid in seen:
            raise _err(path, at("id"), qid, "id", f"duplicate (first at line {seen[qid]})")
        seen[qid] = line
        qtype = item.get("type")
        if qtype not in SUPPORTED_TYPES:
            raise _err(path, at("type"), qid, "type", f"must be one of {SUPPORTED_TYPES}, got {qtype!r}")
        paras = item.get("paraphrases")
        if (not isinstance(paras, list) or not paras
                or not all(isinstance(p, str) and p.strip() for p in paras)):
            raise _err(path, at("paraphrases"), qid, "paraphrases", "must be a non-empty list of non-empty strings")
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise _err(path, at("system"), qid, "system", "must be a string")
        spp = item.get("samples_per_paraphrase")
        if spp is not None and (not isinstance(spp, int) or isinstance(spp, bool) or spp < 1):
            raise _err(path, at("samples_per_paraphrase"), qid, "samples_per_paraphrase", "must be a positive integer")
        jp = item.get("judge_prompts")
        if not isinstance(jp, dict):
            raise _err(path, at("judge_prompts"), qid, "judge_prompts", "must map 'aligned' and 'coherent' to prompts")
        for metric in JUDGE_METRICS:
            tpl = jp.get(metric)
            if not isinstance(tpl, str) or "{answer}" not in tpl or "{question}" not in tpl:
                raise _err(path, lines.get(f"judge_prompts.{metric}", at("judge_prompts")), qid, f"judge_prompts.{metric}",
                           "must be a string containing {question} and {answer}")
        variant = "json" if system is not None else ("template" if qid.endswith("_template") else "plain")
        out.append(Question(qid, tuple(paras), {m: jp[m] for m in JUDGE_METRICS}, system,
                            spp, variant, f"{path}:{line}"))
    return out
