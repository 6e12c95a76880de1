"""Read conversations from a prepared TensorFlow Datasets (TFDS) dataset, without TensorFlow.

Source strings: ``tfds:NAME[/CONFIG][:VERSION][@SPLIT][?data_dir=DIR&KEY=VALUE...]`` (TFDS's own dataset
naming; SPLIT defaults to ``train`` and takes TFDS's slicing, e.g. ``train[:1000]``; ``data_dir`` defaults
to TFDS's, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), or ``tfds:DIR[@SPLIT]`` for one prepared
dataset's directory (the one holding ``dataset_info.json``). Every other query key keeps only the rows whose
feature equals the value, as in ``hf:`` sources.

Rows are read through ``tfds.data_source`` (random access over ``array_record`` files), the TFDS path that
needs no TensorFlow: ``tensorflow_datasets`` and ``array_record`` only (``pip install 'emajax[tfds]'``).
Nothing is downloaded: the dataset must already be prepared in the ``array_record`` (or ``parquet``)
format; ``tfrecord``, TFDS's default, is read only by ``tf.data``. A row is a ``messages`` feature (a
``Sequence`` of ``{"role", "content"}`` texts) or ``prompt`` and ``response`` texts, as for ``hf:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emajax.train.sources import DataError, Messages, _hf_row_messages

PREPARE_HINT = ("prepare it without TensorFlow with tfds.builder(NAME, data_dir=DIR, file_format='array_record')"
                ".download_and_prepare() (the `tfds build` CLI imports TensorFlow)")


def parse_tfds_spec(spec: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """``NAME_OR_DIR[@SPLIT][?k=v&...]`` -> (name or directory, split, data source kwargs, row filters)."""
    from urllib.parse import parse_qsl

    body, _, query = spec.partition("?")
    name, _, split = body.partition("@")
    load, where = {}, {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        (load if k == "data_dir" else where)[k] = v
    if not name:
        raise DataError(f"tfds:{spec}: no dataset name (tfds:NAME[/CONFIG][:VERSION][@SPLIT] or tfds:DIR[@SPLIT])")
    return name, split or "train", load, where


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """One decoded TFDS example as plain Python, feature by feature (see ``plain``)."""
    return {k: plain(v) for k, v in row.items()}


def plain(value: Any) -> Any:
    """A decoded TFDS feature value as plain Python: bytes -> str (UTF-8), numpy arrays -> lists, numpy scalars
    -> numbers, a dict of equal-length lists (how TFDS returns a ``Sequence`` of dicts) -> a list of dicts."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        out = {k: plain(v) for k, v in value.items()}
        cols = list(out.values())
        if cols and all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1:
            return [dict(zip(out, vals)) for vals in zip(*cols)]
        return out
    return value


def _data_source(spec: str, name: str, split: str, load: dict[str, str]) -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tfds:{spec}: reading TFDS datasets needs tensorflow-datasets "
                        f"(pip install 'emajax[tfds]'; TensorFlow is not needed)") from None
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            if load:
                raise DataError(f"tfds:{spec}: data_dir is for dataset names, not for a dataset directory")
            return tfds.builder_from_directory(str(local)).as_data_source(split=split)
        return tfds.data_source(name, split=split, download=False, **load)
    except DataError:
        raise
    except (ValueError, NotImplementedError, AssertionError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds:{spec}: {first} ({PREPARE_HINT})") from None


def tfds_rows(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """(location for error messages, plain row) of every row of ``tfds:SPEC`` (see module doc) that passes its
    filters: what the SFT reader turns into chats and the RL prompt reader into prompts."""
    name, split, load, where = parse_tfds_spec(spec)
    source = _data_source(spec, name, split, load)
    out = []
    for i in range(len(source)):
        row = plain_row(source[i])
        if i == 0:
            missing = [k for k in where if k not in row]
            if missing:
                raise DataError(f"tfds:{spec}: filter feature {missing[0]!r} is not in the dataset "
                                f"(features: {', '.join(row)})")
        if all(str(row[k]) == v for k, v in where.items()):
            out.append((f"tfds:{spec} row {i}", row))
    if not out:
        raise DataError(f"tfds:{spec}: no rows" + (" pass the filter" if where else ""))
    return out


def read_tfds(spec: str) -> list[Messages]:
    """All conversations of the TFDS source ``tfds:SPEC`` (see module doc) that pass its filters."""
    return [_hf_row_messages(row, where) for where, row in tfds_rows(spec)]
