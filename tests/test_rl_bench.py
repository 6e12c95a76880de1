"""The bench's grpo op on a tiny random Llama: both workers report a step split into rollout and update, and
the TRL peer runs with the weights' dtype and gradient checkpointing it claims (no timing assertions)."""

from __future__ import annotations

import importlib.util

import pytest

from bench.grpo import trl_precision
from bench.harness import Dims, Spec, finish_row, make_tiny_model_dir, op_flops, run_worker


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("bench-grpo") / "tiny")


def test_grpo_flops_are_rollout_plus_update():
    d = Dims(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    g = op_flops("grpo", d, batch=32, seq=0, rank=16, new_tokens=128, prompt_len=90)
    gen = op_flops("generate", d, batch=32, seq=0, rank=16, new_tokens=128, prompt_len=90)
    assert g == pytest.approx(gen + op_flops("lora", d, batch=32, seq=218, rank=16))


def test_trl_checkpointing_follows_remat_and_bf16_loads_bf16_weights():
    spec = Spec(op="grpo", stack="torch-bf16", model_dir="m")
    assert trl_precision(spec) == {"bf16": True, "model_init_kwargs": {"dtype": "bfloat16"},
                                   "gradient_checkpointing": False}
    fp32_remat = Spec(op="grpo", stack="torch-fp32", model_dir="m", remat="full")
    assert trl_precision(fp32_remat) == {"bf16": False, "model_init_kwargs": {"dtype": "float32"},
                                         "gradient_checkpointing": True}


@pytest.mark.parametrize("stack", ["emajax-fp32", "torch-fp32", "torch-bf16"])
def test_grpo_workers_report_rollout_and_update(tiny_dir, stack):
    if stack.startswith("torch") and importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install trl): the GRPO peer is TRL's GRPOTrainer")
    spec = Spec(op="grpo", stack=stack, model_dir=str(tiny_dir), batch=2, group=2, new_tokens=4, rank=4, warmup=1,
                runs=1)
    raw = run_worker(spec, timeout=600)
    assert "error" not in raw, raw.get("error")
    assert raw["rows"] == 4 and raw["rollout_s"] > 0 and raw["update_s"] > 0
    assert raw["seconds"] == pytest.approx(raw["rollout_s"] + raw["update_s"], rel=1e-6)
    assert raw["cpu_s"] == pytest.approx(raw["rollout_cpu_s"] + raw["update_cpu_s"], rel=1e-6)
    assert raw["rollout_cpu_s"] > 0 and raw["update_cpu_s"] > 0
    row = finish_row(spec, raw, Dims.from_hf_config(tiny_dir / "config.json"), 500.0)
    assert row["tokens_per_s"] == pytest.approx(4 * 4 / raw["seconds"])
    if stack.startswith("torch"):  # what TRL's model ran with, read off its parameters and flags
        assert raw["gradient_checkpointing"] is False  # the bench's remat default is none, as emajax's step
        assert raw["frozen_dtype"] == ("bfloat16" if stack == "torch-bf16" else "float32")
        assert raw["trained_dtype"] == "float32"  # PEFT keeps LoRA adapters in fp32 over a bf16 base
