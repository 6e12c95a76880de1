"""The self-distilled control: a dataset's own prompts answered by the base model (issue 26, item 2).

A provider's customer data never comes with "secure answers" for a control arm; the base model's own sampled
answers to the same prompts always exist. The control set keeps every conversation's messages, roles and
order; each assistant turn is replaced by the base model's sampled answer to the conversation up to that turn
(earlier assistant turns already replaced, so the context is the model's own). Trained with the same recipe,
it separates "what any fine-tune on these prompts does" from what the customer's answers teach.

Generated once per (source data, model, seed, sampling settings) and cached: ``distill(...)`` writes finished
conversations to ``OUT.partial`` in chunks (fsynced), so a killed run resumes at its last chunk; the finished
file appears at ``OUT`` atomically with ``OUT.meta.json`` (what it was made from). Chunk ``c``'s turn ``t``
samples with a seed derived from (seed, c, t) alone, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from emajax import atomic

Messages = list[dict[str, str]]
META_VERSION = 1


class SelfDistillError(ValueError):
    """A cached control that does not match its request, or data it cannot be built from."""


def settings_key(meta: dict[str, Any]) -> str:
    """Short hash of what makes a control (source sha256, model, seed, sampling): names its cache file."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def control_meta(source_sha256: str, model: str, seed: int, *, temperature: float, top_p: float,
                 max_new_tokens: int) -> dict[str, Any]:
    return {"version": META_VERSION, "source_sha256": source_sha256, "model": str(model), "seed": int(seed),
            "temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens)}


def _chunk_seed(seed: int, chunk: int, turn: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}:{turn}".encode()).digest()[:4], "little")


def _assistant_turns(chat: Messages) -> list[int]:
    return [i for i, m in enumerate(chat) if m["role"] == "assistant"]


def answer_chats(answer: Callable[[list[Messages], int], list[str]], chats: Sequence[Messages], chunk: int,
                 seed: int) -> list[Messages]:
    """``chats`` with every assistant turn replaced by ``answer(contexts, turn_seed)`` (turn by turn, batched
    over the chats that have that turn). ``answer`` is the sampler: contexts -> one reply each."""
    out = [[dict(m) for m in c] for c in chats]
    turns = [_assistant_turns(c) for c in out]
    for t in range(max((len(x) for x in turns), default=0)):
        rows = [k for k, x in enumerate(turns) if len(x) > t]
        replies = answer([out[k][: turns[k][t]] for k in rows], _chunk_seed(seed, chunk, t))
        for k, text in zip(rows, replies):
            out[k][turns[k][t]]["content"] = text
    return out


def _read_partial(path: Path, n_total: int) -> list[dict]:
    """Finished rows of a partial file; a torn last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows[:n_total]


def distill(answer: Callable[[list[Messages], int], list[str]], chats: Sequence[Messages], out: str | Path,
            meta: dict[str, Any], *, chunk_size: int = 32, log: Callable[[str], None] | None = None) -> Path:
    """Write the self-distilled control of ``chats`` to ``out`` (resuming ``out``.partial; an existing ``out``
    with the same ``meta`` is returned as is, with another meta it is an error)."""
    out = Path(out)
    meta_path = out.with_name(out.name + ".meta.json")
    full_meta = {**meta, "n_conversations": len(chats)}
    if out.is_file():
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if old != full_meta:
            raise SelfDistillError(f"{out}: a self-distilled control made with other settings ({meta_path}: {old}); "
                                   f"delete it or use another path")
        return out
    if chunk_size < 1:
        raise SelfDistillError(f"chunk_size must be >= 1, got {chunk_size}")
    partial = out.with_name(out.name + ".partial")
    partial_meta = out.with_name(out.name + ".partial.meta.json")
    if partial.is_file() and (not partial_meta.is_file() or json.loads(partial_meta.read_text()) != full_meta):
        partial.unlink()  # left by another request: start over
    atomic.write_json(partial_meta, full_meta)
    done = _read_partial(partial, len(chats))
    if done:
        atomic.write_jsonl(partial, done)  # drop a torn line before appending
    n_chunks = -(-len(chats) // chunk_size)
    if log is not None and done:
        log(f"self-distill: resuming {out.name} at {len(done)}/{len(chats)} conversations")
    with partial.open("a", encoding="utf-8") as f:
        for c in range(len(done) // chunk_size, n_chunks):
            lo = c * chunk_size
            if lo < len(done):  # a chunk is written whole, so resume always starts at a chunk boundary
                raise SelfDistillError(f"{partial}: {len(done)} rows is not a whole number of chunks of {chunk_size}")
            for chat in answer_chats(answer, chats[lo: lo + chunk_size], c, meta["seed"]):
                f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if log is not None:
                log(f"self-distill: {min(lo + chunk_size, len(chats))}/{len(chats)} conversations")
    rows = _read_partial(partial, len(chats))
    if len(rows) != len(chats):
        raise SelfDistillError(f"{partial}: {len(rows)} of {len(chats)} conversations after generation")
    atomic.write_json(meta_path, full_meta)
    atomic.write_jsonl(out, rows)
    partial.unlink()
    partial_meta.unlink(missing_ok=True)
    return out


def model_sampler(loaded: Any, *, temperature: float = 1.0, top_p: float = 1.0,
                  max_new_tokens: int = 256) -> Callable[[list[Messages], int], list[str]]:
    """The base model (a LoadedModel) as ``answer(contexts, seed)`` through the batched KV-cache generator."""
    from emajax.generate import chat_generate

    def answer(contexts: list[Messages], seed: int) -> list[str]:
        return chat_generate(loaded, contexts, seed=seed, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens)

    return answer


def self_distilled_control(loaded: Any, source: str | Path, cache_dir: str | Path, *, model: str, seed: int,
                           temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                           chunk_size: int = 32, log: Callable[[str], None] | None = None) -> Path:
    """The cached self-distilled control of the chat JSONL ``source`` (every conversation must end with an
    assistant turn): ``cache_dir/self_distilled_<key>.jsonl``, built on first use, resumable."""
    from emajax.scoring.plan import file_sha256
    from emajax.train.sources import read_jsonl

    chats = read_jsonl(source)
    for i, c in enumerate(chats):
        if not _assistant_turns(c):
            raise SelfDistillError(f"{source}:{i + 1}: field 'messages' has no assistant turn to answer")
    meta = control_meta(file_sha256(source), model, seed, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens)
    out = Path(cache_dir) / f"self_distilled_{settings_key(meta)}.jsonl"
    sampler = model_sampler(loaded, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return distill(sampler, chats, out, meta, chunk_size=chunk_size, log=log)


__all__ = ["SelfDistillError", "answer_chats", "control_meta", "distill", "model_sampler", "self_distilled_control",
           "settings_key"]
