"""SFT metrics pinned across refactors of the training core: two tiny runs (LoRA + KL with accumulation and
eval; full fine-tuning + LDIFS with micro-batch normalisation) must reproduce the metrics recorded from the
commit before the core was shared with GRPO (tests/fixtures/sft_golden/*.jsonl).

The rows were bit-identical on the machine that recorded them; the comparison allows 1e-6 relative so the
test holds on CPUs whose XLA code generation rounds differently; ``EMAJAX_GOLDEN_EXACT=1`` demands equality
(the check on the recording machine). ``EMAJAX_RECORD_GOLDEN=1`` rewrites them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import export_tiny_model, write_chats  # noqa: E402

from emajax.train.config import config_from_dict  # noqa: E402
from emajax.train.loop import train  # noqa: E402
from emajax.train.metrics import read_metrics  # noqa: E402

GOLDEN = Path(__file__).parent / "fixtures" / "sft_golden"
TIMING = ("tokens_per_s", "step_time_s")
RUNS = {
    "lora_kl": {"lora": {"rank": 4, "alpha": 8, "rslora": False},
                "data": {"max_len": 128, "batch_size": 4, "grad_accum": 2, "min_bucket": 64},
                "optim": {"lr": 5.0e-3, "warmup_steps": 1}, "defenses": {"kl": {"weight": 0.1, "tokens": "all"}},
                "train": {"epochs": 1, "max_steps": 3, "eval_every": 2}},
    "full_ldifs": {"lora": {"enabled": False},
                   "data": {"max_len": 128, "batch_size": 4, "grad_accum": 2, "min_bucket": 64},
                   "loss": {"normalize": "micro_batch"}, "optim": {"lr": 1.0e-3, "warmup_steps": 1},
                   "defenses": {"ldifs": {"weight": 1.0, "layers": [2, 4]}},
                   "train": {"epochs": 1, "max_steps": 2}},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    model_dir = export_tiny_model(d)
    write_chats(d / "train.jsonl", 24)
    write_chats(d / "eval.jsonl", 8, seed=5)
    return d, model_dir


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_sft_metrics_match_the_recorded_run(data, name):
    d, model_dir = data
    raw = json.loads(json.dumps(RUNS[name]))
    raw["model"] = {"name": str(model_dir)}
    raw["data"].update(train=[str(d / "train.jsonl")], eval=[str(d / "eval.jsonl")])
    raw["train"].update(progress=False, tensorboard=False, export=False)
    raw["mesh"] = {"allow_unused": True}
    out = d / name
    train(config_from_dict(raw), out)
    got = {"metrics": _rows(out / "metrics.jsonl"), "eval": _rows(out / "eval.jsonl")}
    path = GOLDEN / f"{name}.json"
    if os.environ.get("EMAJAX_RECORD_GOLDEN"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    rtol = 0.0 if os.environ.get("EMAJAX_GOLDEN_EXACT") else 1e-6
    for part in ("metrics", "eval"):
        assert [r["step"] for r in got[part]] == [r["step"] for r in want[part]]
        for g, w in zip(got[part], want[part]):
            assert set(g) == set(w), f"{part} step {w['step']}: keys {sorted(set(g) ^ set(w))}"
            for k in w:
                np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=0, err_msg=f"{name} {part} step {w['step']} {k}")
