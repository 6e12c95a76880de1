"""Run observability: metrics.jsonl (one JSON object per step), TensorBoard, tqdm with ETA.

On resume, rows after the restored step are dropped first so the file stays one row per step. Only
process 0 writes (``is_main``). The run directory may be remote (``gs://``): object stores cannot
append, so there the file is rewritten whole at each row (``emajax.paths.write_text``); TensorBoard
writes remote event files through tensorboardX's own writers (``gs://`` needs google-cloud-storage).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from emajax import atomic
from emajax.paths import is_remote, run_path, write_text


def _clean(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Any) -> list[dict[str, Any]]:
    """The rows of a run's JSONL log, local or remote ([] when it does not exist yet)."""
    return atomic.read_jsonl(run_path(path))


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def append_jsonl(path: Any, row: dict[str, Any]) -> None:
    """Add one row to a JSONL file, local (append) or remote (rewritten whole: objects cannot grow)."""
    path = run_path(path)
    if is_remote(path):
        write_text(path, _jsonl([*read_metrics(path), row]))
    else:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class MetricsLogger:
    def __init__(self, run_dir: Any, *, start_step: int, total_steps: int, tensorboard: bool = True,
                 progress: bool = True, is_main: bool = True, desc: str = "train",
                 postfix: tuple[str, ...] = ("loss", "ce", "kl", "ldifs")):
        self.path = run_path(run_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.postfix = postfix  # metrics shown on the progress bar
        self.tb = self.bar = self.f = None
        if not is_main:
            return
        if is_remote(self.path):
            self.rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            write_text(self.path, _jsonl(self.rows))
        else:
            atomic.keep_jsonl_rows(self.path, lambda r: r.get("step", 0) <= start_step)
            self.f = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any], prefix: str = "train") -> None:
        if not self.is_main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        else:
            self.rows.append(row)
            write_text(self.path, _jsonl(self.rows))
        step = int(row["step"])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None and prefix == "train":
            self.bar.update(1)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in self.postfix if k in row})

    def close(self) -> None:
        if not self.is_main:
            return
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
