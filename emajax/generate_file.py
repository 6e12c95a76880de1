"""Batch generation from a JSONL file of chats or prompts (``emajax generate --input``), resumable.

Each input line is ``{"messages": [...]}`` (a chat) or ``{"prompt": "..."}`` (one user message, as
``emajax generate --prompt``); other fields (``id``, metadata) are copied to its answers. Each (line,
sample) becomes one output line ``{"index", "sample", "answer", "finish_reason", "completion_tokens",
"seed", "temperature", "top_p", "max_new_tokens", ...the input line's fields}``, in input order, generated
``batch_size`` rows at a time by one :class:`~emajax.generate.Generator` (the batched KV-cache engine).

Sample ``s`` of line ``i`` draws from its own random stream (``fold_in(key(seed), i * samples + s)``),
whatever else shares its batch, so a resumed run writes what an uninterrupted one would. Resuming: the
output file's complete lines are kept (after a check that they were made from this input with these
settings), a torn last line (a kill mid-write) is cut, and only the missing (line, sample) pairs run;
each batch is appended with one write and an fsync.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from emajax.atomic import jsonl_rows
from emajax.chat import ChatError, validate_messages
from emajax.generate import GenerationError, Generator, SampleRow, check_row, render_prompts

SETTINGS = ("seed", "temperature", "top_p", "max_new_tokens")


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """The input lines, each with ``messages`` (a ``prompt`` becomes one user message); errors name file and line."""
    rows = []
    for lineno, row in jsonl_rows(path, GenerationError):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise GenerationError(f"{where}: expected an object with 'messages' (a chat) or 'prompt' (a string)")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise GenerationError(f"{where}: field 'prompt' must be a non-empty string")
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            try:
                messages = validate_messages(row["messages"], source=f"{where}: messages")
            except ChatError as e:
                raise GenerationError(str(e)) from None
        clash = sorted(set(row) & {"index", "sample", "answer", "finish_reason", "completion_tokens", *SETTINGS})
        if clash:
            raise GenerationError(f"{where}: field {clash[0]!r} is an output field; rename it")
        rows.append({"line": lineno, "messages": messages, "fields": row})
    if not rows:
        raise GenerationError(f"{path}: no prompts")
    return rows


def _resume(out: Path, n_prompts: int, samples: int, settings: dict, inputs: list[dict]) -> set[tuple[int, int]]:
    """The (index, sample) pairs ``out`` already holds; cuts a torn last line; refuses another run's file."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):  # killed mid-write: drop the partial line
        with open(out, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    done = set()
    for lineno, row in jsonl_rows(out, GenerationError):
        where = f"{out}:{lineno}"
        if not isinstance(row, dict) or any(row.get(k) != v for k, v in settings.items()):
            raise GenerationError(f"{where}: made with other settings than {settings} (use another --out, or "
                                  f"delete it to start over)")
        i, s = row.get("index"), row.get("sample")
        if not (isinstance(i, int) and isinstance(s, int) and 0 <= i < n_prompts and 0 <= s < samples):
            raise GenerationError(f"{where}: index/sample ({i}, {s}) is not one of this input's "
                                  f"{n_prompts} prompts x {samples} samples")
        if any(row.get(k) != v for k, v in inputs[i]["fields"].items()):
            raise GenerationError(f"{where}: its prompt differs from input line {inputs[i]['line']} (the input "
                                  f"changed since: use another --out)")
        done.add((i, s))
    return done


def generate_file(loaded: Any, input_path: str | os.PathLike, out_path: str | os.PathLike, *, samples: int = 1,
                  temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                  batch_size: int = 16, system: str | None = None, generator: Generator | None = None,
                  on_batch: Callable[[int, int], None] | None = None, progress: bool = True) -> dict:
    """Answer every input line ``samples`` times into ``out_path`` (see the module doc); resumes a partial
    ``out_path``. ``loaded``: a ``LoadedModel`` (``.model``, ``.tokenizer``); ``on_batch(rows done, rows in
    all)`` after each appended batch. Returns ``{"rows", "resumed", "generated"}``."""
    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise GenerationError(f"need samples, batch_size and max_new_tokens >= 1, got {samples}, {batch_size}, "
                              f"{max_new_tokens}")
    inputs = read_prompts(input_path)
    tok = loaded.tokenizer
    prompts = render_prompts(tok, [r["messages"] for r in inputs], system=system, source=str(input_path))
    gen = generator or Generator(loaded.model, tok)
    settings = {"seed": seed, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    rows = {(i, s): SampleRow(prompts[i], max_new_tokens, temperature, top_p, seed, i * samples + s)
            for i in range(len(inputs)) for s in range(samples)}
    for i, r in enumerate(inputs):  # every prompt fits before anything runs
        try:
            check_row(i, rows[(i, 0)], loaded.model.cfg)
        except GenerationError as e:
            raise GenerationError(f"{input_path}:{r['line']}: {e}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(out, len(inputs), samples, settings, inputs)
    todo = [k for k in rows if k not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows), initial=len(done), unit="answer", desc="generate", dynamic_ncols=True)
    stops = set(gen.eos_ids)
    try:
        with open(out, "ab") as f:
            for b in range(0, len(todo), batch_size):
                keys = todo[b:b + batch_size]
                outs = gen.rows([rows[k] for k in keys])
                lines = []
                for (i, s), ids in zip(keys, outs):
                    ended = bool(ids) and ids[-1] in stops
                    lines.append(json.dumps({
                        **inputs[i]["fields"], "index": i, "sample": s,
                        "answer": tok.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip(),
                        "finish_reason": "stop" if ended else "length", "completion_tokens": len(ids), **settings},
                        ensure_ascii=False) + "\n")
                f.write("".join(lines).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(keys))
                if on_batch is not None:
                    on_batch(len(done) + b + len(keys), len(rows))
    finally:
        if bar is not None:
            bar.close()
    return {"rows": len(rows), "resumed": len(done), "generated": len(todo)}
