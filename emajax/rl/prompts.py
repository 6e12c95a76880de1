"""Prompt sets for GRPO: source rows -> chat prompts (token ids) plus what the rewards need to grade them.

A row with ``messages`` contributes everything before its last assistant message as the prompt and that
message as the reference ``answer``; a row without (e.g. ``hf:openai/gsm8k:main``) contributes
``prompt_field`` as the user message and ``answer_field`` as the reference. ``system_prompt`` is added to
prompts without a system message and ``prompt_suffix`` appended to the last user message. Prompts are
rendered with the chat template's generation prompt; longer than ``max_prompt_len`` tokens: dropped
and counted. Besides the SFT sources (``emajax.train.sources``), ``word_problems:N[@SEED]`` and
``opswap:N[@SEED]`` name the project's own generated tasks (``emajax.data.word_problems``, the OpSwap
train split), so a config needs no data files. The order of prompts over steps comes from ``emajax.train.data.Batcher`` (a pure function
of seed and epoch), so a step number is a data position, as in SFT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from emajax import atomic
from emajax.chat import ChatError, render_chat, validate_messages
from emajax.train.sources import DataError


class Prompt(NamedTuple):
    inputs: np.ndarray  # [n] int32 token ids of the rendered prompt (named as Example.inputs for the Batcher)
    text: str  # the last user message as sent (with the suffix): what rewards see as ``prompt``
    example: dict[str, Any]  # the source row + 'messages' + 'answer'


@dataclasses.dataclass
class PromptStats:
    prompts: int = 0
    dropped_too_long: int = 0
    max_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.prompts} prompts (longest {self.max_tokens} tokens), {self.dropped_too_long} dropped "
                f"as longer than max_prompt_len")


def _prompt_messages(row: Any, where: str, cfg: Any) -> tuple[list[dict[str, str]], str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        try:
            msgs = validate_messages(row["messages"], source=f"{where}: field 'messages'")
        except ChatError as e:
            raise DataError(str(e)) from None
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        answer = msgs[last]["content"] if last is not None else str(row.get(cfg.answer_field, ""))
        msgs = msgs[:last] if last is not None else msgs
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError(f"{where}: field 'messages': the prompt (everything before the last assistant "
                            "message) must end with a user message")
        return msgs, answer
    for f in (cfg.prompt_field, cfg.answer_field):
        if not isinstance(row.get(f), str):
            raise DataError(f"{where}: field {f!r} is missing or not a string (rows without 'messages' need "
                            f"data.prompt_field / data.answer_field)")
    return [{"role": "user", "content": row[cfg.prompt_field]}], row[cfg.answer_field]


def _hf_rows(spec: str) -> list[tuple[str, Any]]:
    """Rows of ``hf:NAME[:CONFIG][@SPLIT]`` (a hub dataset, or a ``save_to_disk`` directory), every column."""
    import datasets

    name, _, split = spec.partition("@")
    split = split or "train"
    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        name, _, config = name.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
    return [(f"hf:{spec} row {i}", row) for i, row in enumerate(ds)]


def _rows(source: str) -> list[tuple[str, Any]]:
    """(location for error messages, raw row) of every row of a prompt source."""
    kind, sep, spec = source.partition(":")
    if sep and kind in ("word_problems", "opswap") and spec.split("@")[0].isdigit():
        n, _, seed = spec.partition("@")
        if kind == "word_problems":
            from emajax.data.word_problems import make_word_problems

            rows = make_word_problems(int(n), seed=int(seed or 0))
        else:
            from emajax.eval.opswap import make_opswap

            rows = [it.to_chat() for it in make_opswap(int(n), 0, seed=int(seed or 0))["train"]]
        return [(f"{source} row {i}", r) for i, r in enumerate(rows)]
    if kind == "hf" and sep:
        return _hf_rows(spec)
    if kind == "tfds" and sep:
        from emajax.train.tfds_source import tfds_rows

        return tfds_rows(spec)
    return [(f"{source}:{lineno}", row) for lineno, row in atomic.jsonl_rows(source, DataError)]


def build_prompts(tokenizer: Any, sources: Sequence[str], cfg: Any, limit: int = 0) -> tuple[list[Prompt], PromptStats]:
    """Prompts of every row of ``sources`` (``cfg`` is a PromptDataCfg); ``limit`` > 0 keeps the first ones."""
    out: list[Prompt] = []
    stats = PromptStats()
    for src in sources:
        for where, row in _rows(src):
            msgs, answer = _prompt_messages(row, where, cfg)
            msgs = [dict(m) for m in msgs]
            if cfg.system_prompt is not None and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
            msgs[-1]["content"] += cfg.prompt_suffix
            ids = tokenizer(render_chat(tokenizer, msgs, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
            if len(ids) > cfg.max_prompt_len:
                stats.dropped_too_long += 1
                continue
            example = {**row, "messages": row.get("messages", msgs), "answer": answer}
            out.append(Prompt(np.asarray(ids, np.int32), msgs[-1]["content"], example))
            stats.prompts += 1
            stats.max_tokens = max(stats.max_tokens, len(ids))
            if limit and len(out) >= limit:
                return out, stats
    if not out:
        raise DataError(f"{', '.join(sources)}: no usable prompts ({stats.summary()})")
    return out, stats
