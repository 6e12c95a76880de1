"""Run observability: metrics.jsonl (one JSON object per step), TensorBoard, tqdm with ETA.

On resume, rows after the restored step are dropped first so the file stays one row per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emajax import atomic


def _clean(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return atomic.read_jsonl(path)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, start_step: int, total_steps: int, tensorboard: bool = True,
                 progress: bool = True, is_main: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.is_main = is_main
        self.tb = self.bar = None
        if not is_main:
            return
        atomic.keep_jsonl_rows(self.path, lambda r: r.get("step", 0) <= start_step)
        self.f = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any], prefix: str = "train") -> None:
        if not self.is_main:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        step = int(row["step"])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None and prefix == "train":
            self.bar.update(1)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "ce", "kl", "ldifs") if k in row})

    def close(self) -> None:
        if not self.is_main:
            return
        self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
