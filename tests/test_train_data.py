"""Training data and config: malformed rows, truncation, deterministic bucketed batches, overrides."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import tiny_tokenizer, write_chats  # noqa: E402

from emajax.train.config import TrainConfigError, load_config  # noqa: E402
from emajax.train.data import Batcher, encode_examples, DataStats, length_buckets  # noqa: E402
from emajax.train.sources import DataError, read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_malformed_rows_name_file_line_field(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    cases = {
        '{"messages": [{"role": "user"}]}': r":2: .*messages.*\[0\].*'content' is missing",
        '{"text": "x"}': r":2: field 'messages' is missing",
        '{"messages": [{"role": "robot", "content": "x"}]}': r":2: .*'role'",
        "{not json": r":2: invalid JSON",
        '{"messages": [{"role": "user", "content": 3}]}': r":2: .*'content' must be a string",
    }
    for bad, pattern in cases.items():
        p = tmp_path / "d.jsonl"
        p.write_text(good + "\n" + bad + "\n")
        with pytest.raises(DataError, match=pattern) as ei:
            read_jsonl(p)
        assert str(p) in str(ei.value)


def test_truncation_is_counted(tmp_path, tok):
    convs = read_jsonl(write_chats(tmp_path / "t.jsonl", 10))
    st = DataStats()
    ex = encode_examples(tok, convs, 40, stats=st)
    assert st.truncated > 0 and all(len(e.inputs) <= 39 for e in ex)
    assert st.examples + st.dropped_no_answer == 10
    full = encode_examples(tok, convs, 4096, stats=(st2 := DataStats()))
    assert st2.truncated == 0 and len(full) == 10
    for e in full:  # answer-only mask: the loss covers the assistant content + <|im_end|>
        assert tok.decode(e.targets[e.loss_mask].tolist()).endswith("<|im_end|>")


def test_batches_deterministic_bucketed_and_cover_each_epoch(tmp_path, tok):
    ex = encode_examples(tok, read_jsonl(write_chats(tmp_path / "t.jsonl", 37)), 512)
    mk = lambda seed: Batcher(ex, batch_size=4, grad_accum=2, seed=seed, min_bucket=16, max_len=512,
                              bucket_window=2, pad_id=257)
    b1, b2, b3 = mk(0), mk(0), mk(1)
    assert b1.steps_per_epoch == 5
    e0 = b1.epoch_batches(0)
    assert set(np.concatenate(e0).tolist()) == set(range(37))  # every example, topped up to 40
    assert [a.tolist() for a in e0] == [a.tolist() for a in b2.epoch_batches(0)]
    assert [a.tolist() for a in e0] != [a.tolist() for a in b1.epoch_batches(1)]  # reshuffled per epoch
    assert [a.tolist() for a in e0] != [a.tolist() for a in b3.epoch_batches(0)]
    bt = b1.batch_at(7)
    assert bt.inputs.shape[:2] == (2, 4) and bt.inputs.shape[2] in (16, 32, 64, 128, 256, 512)
    np.testing.assert_array_equal(bt.inputs, mk(0).batch_at(7).inputs)  # resume gets the same batch
    assert (bt.inputs[~bt.attn_mask] == 257).all() and (bt.loss_mask[~bt.attn_mask] == 0).all()
    assert length_buckets(16, 512) == [16, 32, 64, 128, 256, 512] and length_buckets(64, 300) == [64, 128, 256, 300]
    assert length_buckets(48, 160) == [48, 96, 160] and length_buckets(160, 160) == [160]


def test_config_overrides_paths_and_errors(tmp_path):
    (tmp_path / "cfgs").mkdir()
    write_chats(tmp_path / "train.jsonl", 3)
    cfgp = tmp_path / "cfgs" / "c.yaml"
    cfgp.write_text("data:\n  train: [../train.jsonl]\noptim:\n  lr: 1e-4\n")
    cfg = load_config(cfgp, ["defenses.kl.weight=0.1", "lora.enabled=false", "data.batch_size=2",
                             "defenses.ldifs.layers=[1, 2]"])
    assert cfg.data.train == [str((tmp_path / "train.jsonl").resolve())]
    assert cfg.optim.lr == 1e-4 and cfg.defenses.kl.weight == 0.1 and cfg.lora.enabled is False
    assert cfg.data.batch_size == 2 and cfg.defenses.ldifs.layers == [1, 2]
    with pytest.raises(TrainConfigError, match=r"defenses\.kl\.wieght: unknown key"):
        load_config(cfgp, ["defenses.kl.wieght=0.1"])
    with pytest.raises(TrainConfigError, match=r"data\.batch_size: expected an integer"):
        load_config(cfgp, ["data.batch_size=two"])
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(cfgp, ["data.train=[nope.jsonl]"])


def test_lora_section_is_the_models_lora_config(tmp_path):
    """The `lora:` keys build the one LoRA type; keys not given keep the section's defaults (rs-LoRA r32 a64)."""
    from emajax.models.lora import LoraConfig
    from emajax.train.loop import lora_config

    write_chats(tmp_path / "train.jsonl", 3)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text("data: {train: [train.jsonl]}\nmodel: {param_dtype: bfloat16}\nlora: {rank: 8, targets: [q_proj, v]}\n")
    cfg = load_config(cfgp)
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.targets == ("q", "v")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora, cfg.lora.enabled, cfg.lora.dtype) == (8, 64.0, True, True, None)
    assert lora_config(cfg) == LoraConfig(rank=8, alpha=64.0, rslora=True, targets=("q", "v"), dtype="bfloat16")
    assert cfg.to_dict()["lora"]["targets"] == ["q", "v"]  # YAML-safe types in the run's config.yaml
    assert load_config(cfgp, ["lora.dtype=float32"]).lora.dtype == "float32"
    assert lora_config(load_config(cfgp, ["lora.enabled=false"])) is None
    with pytest.raises(TrainConfigError, match=r"lora: lora rank must be positive"):
        load_config(cfgp, ["lora.rank=0"])
    with pytest.raises(TrainConfigError, match=r"lora: unknown LoRA target"):
        load_config(cfgp, ["lora.targets=[q, attn]"])


REPO_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml")
                      if p.parent.name not in ("grid", "guard") and "grpo" not in p.name)
# grid specs: tests/test_grid.py; `emajax rl` configs: tests/test_rl_run.py; guard policies and jobs:
# tests/test_guard_spec.py


def test_cpu_configs_are_one_per_method():
    names = [p.name for p in REPO_CONFIGS if p.parent.name == "cpu"]
    assert names == [f"smollm2-medical-{d}.yaml" for d in
                     sorted(["none", "kl", "ldifs", "steering", "inoculation", "interleave"])]


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_repo_configs_load(path, request):
    if any("../shared/" in line.split("#")[0] for line in path.read_text().splitlines()):
        request.getfixturevalue("shared_em")  # its data lies in ../shared: skips with the reason when absent
    try:
        load_config(path)
    except TrainConfigError as e:  # paper configs name data/vector files a user provides
        assert "not found" in str(e) and path.parent.name == "paper", e


def test_hf_dataset_source(tmp_path):
    import datasets

    from emajax.train.sources import read_conversations

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    convs = read_conversations(f"hf:{tmp_path / 'ds'}")
    assert [c[0]["content"] for c in convs] == ["q0", "q1", "q2"]
    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="field 'messages' is missing"):
        read_conversations(f"hf:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match=r"kaggle:x/train: unknown source type 'kaggle:'"):
        read_conversations("kaggle:x/train")  # only JSONL, hf: and tfds: are sources


def test_hf_prompt_response_source_with_config_split_and_filter(tmp_path):
    """WildGuardMix's layout (prompt / response / labels) read as chats, filtered by a column value:
    hf:DIR@train?response_harm_label=unharmful keeps the benign-response rows, in order."""
    import datasets

    from emajax.train.sources import parse_hf_spec, read_conversations

    rows = [{"prompt": f"p{i}", "response": None if i == 3 else f"r{i}",
             "response_harm_label": ["unharmful", "harmful", "unharmful", None, "unharmful"][i]} for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "wg"))
    convs = read_conversations(f"hf:{tmp_path / 'wg'}@train?response_harm_label=unharmful")
    assert convs == [[{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"r{i}"}]
                     for i in (0, 2, 4)]
    with pytest.raises(DataError, match="row 3: field 'response' is missing"):
        read_conversations(f"hf:{tmp_path / 'wg'}@train")  # unfiltered, the prompt-only row is an error
    with pytest.raises(DataError, match="filter column 'label'"):
        read_conversations(f"hf:{tmp_path / 'wg'}@train?label=x")
    assert parse_hf_spec("allenai/wildguardmix:wildguardtrain@train?response_harm_label=unharmful") == (
        "allenai/wildguardmix", "wildguardtrain", "train", {}, {"response_harm_label": "unharmful"})
    assert parse_hf_spec("json?data_files=https://h/x.jsonl") == ("json", None, "train",
                                                                 {"data_files": "https://h/x.jsonl"}, {})
