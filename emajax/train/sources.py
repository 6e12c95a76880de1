"""Read conversations from chat JSONL files or Hugging Face datasets.

Source strings: a path to a ``.jsonl`` file (one ``{"messages": [...]}`` per line), or
``hf:NAME[:CONFIG][@SPLIT][?KEY=VALUE&...]`` (``datasets.load_dataset``; a local dataset directory
saved with ``save_to_disk`` works as ``hf:/path``), or ``tfds:NAME[@SPLIT]`` (``emajax.train.tfds_source``). A malformed row raises an error naming the file
(or dataset), the line (or row) and the field.

Hugging Face rows are a ``messages`` column, or ``prompt`` and ``response`` string columns (WildGuardMix,
the paper's general pool), read as one user turn and one assistant turn. In the query, ``data_files``
is passed to ``load_dataset`` (``hf:json@train?data_files=URL`` reads a JSONL file by URL) and every
other key keeps only the rows whose column equals the value, e.g.
``hf:allenai/wildguardmix:wildguardtrain@train?response_harm_label=unharmful``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from emajax import atomic

from emajax.chat import ChatError, validate_messages

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A training / eval row that cannot be used; the message names file, line and field."""


def _row_messages(row: Any, where: str) -> Messages:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' field, got {type(row).__name__}")
    if "messages" not in row:
        raise DataError(f"{where}: field 'messages' is missing")
    try:
        return validate_messages(row["messages"], source=f"{where}: field 'messages'")
    except ChatError as e:
        raise DataError(str(e)) from None


def chat_rows(path: str | Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, dict, Messages]]:
    """(line number, row, its checked messages) of each conversation of a chat JSONL file; ``error`` names the
    file, line and field of the first bad row."""
    for lineno, row in atomic.jsonl_rows(path, error):
        try:
            yield lineno, row, _row_messages(row, f"{path}:{lineno}")
        except DataError as e:
            raise error(str(e)) from None


def read_jsonl(path: str | Path) -> list[Messages]:
    out = [msgs for _, _, msgs in chat_rows(path)]
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, dict[str, str], dict[str, str]]:
    """``NAME[:CONFIG][@SPLIT][?k=v&...]`` -> (name, config, split, load kwargs, column filters)."""
    from urllib.parse import parse_qsl

    body, _, query = spec.partition("?")
    body, _, split = body.partition("@")
    name, config = body, None
    if ":" in body and not Path(body).exists():
        name, _, config = body.partition(":")
    load, where = {}, {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        (load if k == "data_files" else where)[k] = v
    return name, config or None, split or "train", load, where


def _hf_row_messages(row: dict, where: str) -> Messages:
    if "messages" in row:
        return _row_messages(row, where)
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is missing or empty (a row needs 'messages', or 'prompt' and "
                        f"'response')")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: field 'response' is missing or empty (filter such rows out, e.g. "
                        f"?response_harm_label=unharmful)")
    return _row_messages({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}]}, where)


def _read_hf(spec: str) -> list[Messages]:
    import datasets

    name, config, split, load, where = parse_hf_spec(spec)
    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, config, split=split, **load)
    cols = ds.column_names
    if "messages" not in cols and not {"prompt", "response"} <= set(cols):
        raise DataError(f"hf:{spec}: field 'messages' is missing, and so is 'prompt'/'response' "
                        f"(columns: {', '.join(cols)})")
    unknown = [k for k in where if k not in cols]
    if unknown:
        raise DataError(f"hf:{spec}: filter column {unknown[0]!r} is not in the dataset (columns: {', '.join(cols)})")
    out = []
    for i, row in enumerate(ds):
        if all(str(row[k]) == v for k, v in where.items()):
            out.append(_hf_row_messages(row, f"hf:{spec} row {i}"))
    if not out:
        raise DataError(f"hf:{spec}: no rows" + (" pass the filter" if where else ""))
    return out


def read_conversations(source: str) -> list[Messages]:
    """All conversations of one source string (see module doc)."""
    if source.startswith("hf:"):
        return _read_hf(source[3:])
    if source.startswith("tfds:"):  # TFDS without TensorFlow: emajax.train.tfds_source
        from emajax.train.tfds_source import read_tfds

        return read_tfds(source[5:])
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", source)
    if scheme and len(scheme.group(1)) > 1 and not Path(source).exists():
        raise DataError(f"{source}: unknown source type {scheme.group(0)!r} (a chat JSONL path, hf:NAME[@SPLIT] or tfds:NAME[@SPLIT])")
    return read_jsonl(source)
