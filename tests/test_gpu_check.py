"""The GPU check script's CPU dry run (DRY_RUN=1: the same steps at tiny shapes on the CPU): every step
runs and writes its results. The GPU run itself needs a lent CUDA machine (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    pytest.importorskip("torch", reason="the check benches against transformers + PEFT (torch)")
    pytest.importorskip("peft", reason="the check benches against transformers + PEFT")
    # PY: this interpreter (the one with jax), not whatever python3 comes first on PATH
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PY": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    out = tmp_path / "out"
    status = (out / "status.txt").read_text()
    assert proc.returncode == 0, f"{status}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert [l.split()[0] for l in status.splitlines()] == ["tests", "train_compare", "bench"]
    assert json.loads((out / "train_compare.json").read_text())["ok"]
    rows = json.loads((out / "bench.json").read_text())["results"]
    assert {(r["op"], r["stack"]) for r in rows} == {("lora_kl", "emajax-bf16"), ("lora_kl", "torch-bf16")}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    summary = (out / "summary.txt").read_text()
    assert "tok/s" in summary and "MFU" in summary
