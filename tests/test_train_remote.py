"""A run directory on gs://: config, metrics, checkpoints (orbax through TensorStore's GCS driver),
resume and export all land in the bucket, served offline by tests/_fake_gcs.py; nothing lands in a
local directory named ``gs:``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _fake_gcs import fake_gcs  # noqa: E402
from _train_tiny import export_tiny_model, write_chats  # noqa: E402

from emajax.cli import main  # noqa: E402


def test_gs_run_directory_trains_resumes_and_exports(tmp_path, monkeypatch, capsys):
    model_dir = export_tiny_model(tmp_path)
    write_chats(tmp_path / "train.jsonl", 32)
    write_chats(tmp_path / "eval.jsonl", 4, seed=3)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: {model_dir}}}
lora: {{rank: 4, alpha: 8, rslora: false}}
data: {{train: [train.jsonl], eval: [eval.jsonl], max_len: 64, batch_size: 8, grad_accum: 1, min_bucket: 64}}
train: {{epochs: 1, save_every: 2, keep_checkpoints: 1, progress: false, tensorboard: false}}
mesh: {{fsdp: -1}}
""")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    bucket = tmp_path / "gcs"
    with fake_gcs(bucket):
        assert main(["train", str(cfg), "--out", "gs://bkt/run", "--max-steps", "2"]) == 0
        run = bucket / "bkt" / "run"
        assert (run / "checkpoints" / "2" / "commit_success.txt").is_file()
        assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert main(["train", str(cfg), "--out", "gs://bkt/run"]) == 0
    out = capsys.readouterr().out
    assert "resumed from gs://bkt/run/checkpoints/2" in out and "export gs://bkt/run/export" in out
    assert not any(work.iterdir()), f"local files written: {list(work.iterdir())}"  # no ./gs:/bkt/run
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(l)["step"] for l in (run / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]  # each invocation evaluates at its end
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]  # keep_checkpoints: 1
    assert (run / "config.yaml").is_file() and (run / "data_stats.json").is_file()
    assert {p.name for p in (run / "export").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
