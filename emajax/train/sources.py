"""Read conversations from chat JSONL files or Hugging Face datasets.

Source strings: a path to a ``.jsonl`` file (one ``{"messages": [...]}`` per line), or
``hf:NAME`` / ``hf:NAME@SPLIT`` (``datasets.load_dataset``, a ``messages`` column; a local
dataset directory saved with ``save_to_disk`` works as ``hf:/path``). A malformed row raises an
error naming the file (or dataset), the line (or row) and the field.
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


def _read_hf(spec: str) -> list[Messages]:
    import datasets

    name, _, split = spec.partition("@")
    split = split or "train"
    local = Path(name)
    if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split)
    if "messages" not in ds.column_names:
        raise DataError(f"hf:{spec}: field 'messages' is missing (columns: {', '.join(ds.column_names)})")
    return [_row_messages(row, f"hf:{spec} row {i}") for i, row in enumerate(ds)]


def read_conversations(source: str) -> list[Messages]:
    """All conversations of one source string (see module doc)."""
    if source.startswith("hf:"):
        return _read_hf(source[3:])
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", source)
    if scheme and len(scheme.group(1)) > 1 and not Path(source).exists():
        raise DataError(f"{source}: unknown source type {scheme.group(0)!r} (a chat JSONL path, or hf:NAME[@SPLIT])")
    return read_jsonl(source)
