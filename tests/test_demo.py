"""``emajax demo`` end to end at tiny scale on a tiny random HF model directory (not the 20-minute demo)."""

from __future__ import annotations

import json

import pytest

from _train_tiny import tiny_model, tiny_tokenizer
from emajax.demo.plan import METHODS, make_plan
from emajax.train.config import config_from_dict

METHODS_RUN = ("none", "steering", "interleave_pp")  # persona vector, scoring + selection, monitor, resume


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from emajax.models.hf_io import export_hf

    d = tmp_path_factory.mktemp("tiny_hf")
    export_hf(tiny_model(lora=None), d, tiny_tokenizer())
    return d


def test_every_method_config_is_a_valid_train_config(tmp_path):
    plan = make_plan("cpu")
    train = tmp_path / "t.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    for m in METHODS:
        raw = plan.train_config(m, str(train), vector=str(tmp_path / "v.safetensors"), selection=str(train),
                                pool=str(train))
        cfg = config_from_dict(raw, source=m)
        assert cfg.lora.rank == 32 and cfg.data.max_len == cfg.data.min_bucket == 160  # one compiled shape
    d = lambda m: config_from_dict(plan.train_config(m, str(train), vector="v", selection=str(train),  # noqa: E731
                                                     pool=str(train)), source=m).defenses
    assert d("kl").kl.weight == 0.1 and d("ldifs").ldifs.weight == 1.0 and d("steering").steering.coef == 5.0
    assert d("inoculation").inoculation.enabled and d("interleave").interleave.ratio == 0.05
    assert d("none").kl.weight == 0 and not d("none").interleave.data
    with pytest.raises(ValueError, match="needs vector"):
        plan.train_config("steering", str(train))
    assert make_plan("cpu", methods=("interleave_pp",)).methods == ("none", "interleave_pp")
    with pytest.raises(ValueError, match="unknown demo method"):
        make_plan("cpu", methods=("bogus",))


def test_tiny_demo_end_to_end_and_resume(tiny_dir, tmp_path, capsys):
    from emajax.demo.pipeline import Demo

    out = tmp_path / "demo"
    plan = make_plan("tiny", model=str(tiny_dir), methods=METHODS_RUN)
    report = Demo(plan, out).run()
    md = report.read_text()
    for label in ("Base model", "No defense", "Steering", "Interleaving++"):
        assert f"| {label} |" in md
    for png in ("methods.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for m in METHODS_RUN:
        run = out / "runs" / m
        probes = json.loads((run / "probes.json").read_text())
        assert set(probes["pairs"]) == {"general", "in_domain"} and set(probes["nll"]) == {"benign"}
        assert probes["step"] == json.loads((run / "data_stats.json").read_text())["total_steps"]
        steps = [json.loads(l)["step"] for l in (run / "monitor.jsonl").read_text().splitlines()]
        assert steps == list(range(0, probes["step"] + 1))  # monitor_every=1 at tiny scale, step 0 = base
        assert (run / "export" / "adapter_config.json").is_file()
    sel = (out / "data" / "interleave_pp_selection.jsonl").read_text().splitlines()
    assert len(sel) == 3 and all("selection" in json.loads(l) for l in sel)  # round(0.25 * 8 / 0.75) = 3
    assert json.loads((out / "runs" / "interleave_pp" / "data_stats.json").read_text())["safe_examples"] == 3
    assert (out / "persona" / "evil.safetensors").is_file()
    timings = json.loads((out / "timings.json").read_text())
    assert all(v["wall_s"] >= 0 for v in timings["stages"].values()) and timings["total_wall_s"] > 0
    capsys.readouterr()

    # re-running the same command redoes nothing (every stage's result exists), only the report
    mtimes = {m: (out / "runs" / m / "probes.json").stat().st_mtime for m in METHODS_RUN}
    Demo(plan, out).run()
    err = capsys.readouterr().err
    assert err.count("done already, skipped") == 2 + 1 + 1 + len(METHODS_RUN)
    assert mtimes == {m: (out / "runs" / m / "probes.json").stat().st_mtime for m in METHODS_RUN}

    with pytest.raises(ValueError, match="different plan"):
        Demo(make_plan("tiny", model=str(tiny_dir), methods=METHODS_RUN, lr=0.5), out).run()
