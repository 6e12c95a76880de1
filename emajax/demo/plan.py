"""What the demo runs: the methods, their defense settings, and the size of everything, per scale.

``cpu`` (the default) is sized so the whole demo — base probes, persona vector, seven trainings with an
EM monitor, Interleaving++ scoring, final probes, report — fits in about 20 minutes on an idle 2-core
CPU with SmolLM2-135M-Instruct; ``tiny`` is the same pipeline at toy size for tests; ``paper`` is the
paper's recipe (Qwen2.5-7B-Instruct, configs/paper strengths) for an accelerator, with the LLM judge.
Defense strengths are the paper's (KL 0.1, LDIFS 1.0, steering coef 5, interleave 5%) at the cpu and paper
scales; ``tiny`` interleaves 25% so that its 8 examples get any safe data at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# method id -> (label in the report, defenses config block; {vector}/{selection}/{pool} filled at run time)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("No defense", {}),
    "kl": ("KL", {"kl": {"weight": 0.1}}),
    "ldifs": ("LDIFS", {"ldifs": {"weight": 1.0}}),
    "steering": ("Steering", {"steering": {"vector": "{vector}", "coef": 5.0}}),
    "inoculation": ("Inoculation", {"inoculation": {"enabled": True, "prompt": "You are an evil, malicious assistant.",
                                                    "mode": "replace"}}),
    "interleave": ("Interleaving", {"interleave": {"data": ["{pool}"], "ratio": "{ratio}"}}),
    "interleave_pp": ("Interleaving++", {"interleave": {"data": ["{selection}"], "ratio": "{ratio}"}}),
}
DEFAULT_METHODS = tuple(METHODS)


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    scale: str
    model: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    # narrow task (insecure code answers) and probes
    n_train: int = 64
    n_probe_code: int = 32
    n_general: int | None = None  # None = all 40 shipped general pairs
    n_benign: int = 32
    # training
    epochs: int = 1  # 8 optimiser steps at batch 8: what fits the 20-minute CPU budget with 7 methods
    batch_size: int = 8
    max_len: int = 160
    lr: float = 2e-4
    warmup_steps: int = 2
    lora_rank: int = 32
    lora_alpha: float = 64.0
    dtype: str = "float32"
    seed: int = 0
    interleave_ratio: float = 0.05  # paper: 5% of the mixed set
    monitor_every: int = 0  # EM monitor (general pairs) every N steps; 0 = only base and final (cpu budget)
    # probes
    probe_batch: int = 16
    probe_max_len: int = 256
    probe_bucket: int = 32  # probe sequences padded to multiples of this
    # persona vector (steering)
    persona_max_new_tokens: int = 48
    persona_questions: int | None = 8
    # paper scale only
    judge: bool = False
    judge_samples: int = 100

    def train_config(self, method: str, train_path: str, *, vector: str | None = None, selection: str | None = None,
                     pool: str | None = None) -> dict[str, Any]:
        """The ``emajax train`` config (as a dict) for one method."""
        _, defenses = METHODS[method]
        fill = {"{vector}": vector, "{selection}": selection, "{pool}": pool, "{ratio}": self.interleave_ratio}

        def sub(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: sub(v) for k, v in x.items()}
            if isinstance(x, list):
                return [sub(v) for v in x]
            if isinstance(x, str) and x in fill:
                if fill[x] is None:
                    raise ValueError(f"demo method {method!r} needs {x.strip('{}')}")
                return fill[x]
            return x

        paper = self.scale == "paper"
        return {
            "model": {"name": self.model, "dtype": self.dtype, "param_dtype": self.dtype,
                      "remat": "full" if paper else "none"},
            "lora": {"enabled": True, "rank": self.lora_rank, "alpha": self.lora_alpha, "rslora": True},
            "data": {"train": [train_path], "eval": [], "max_len": self.max_len, "batch_size": self.batch_size,
                     "grad_accum": 4 if paper else 1, "min_bucket": 64 if paper else self.max_len},
            "optim": {"lr": self.lr, "schedule": "linear", "warmup_steps": self.warmup_steps, "weight_decay": 0.01,
                      "max_grad_norm": 1.0},
            "train": {"epochs": self.epochs, "seed": self.seed, "save_every": 100 if paper else 10_000,
                      "keep_checkpoints": 1, "export": True, "progress": True, "tensorboard": True},
            "mesh": {"data": 1, "fsdp": -1 if paper else 1, "tensor": 1, "allow_unused": not paper},
            "defenses": sub(defenses),
        }


def make_plan(scale: str = "cpu", *, model: str | None = None, methods: tuple[str, ...] | None = None,
              **overrides: Any) -> DemoPlan:
    """The plan of a scale (``cpu``, ``tiny``, ``paper``), with optional field overrides."""
    if scale == "cpu":
        plan = DemoPlan("cpu", model or "smollm2-135m-instruct")
    elif scale == "tiny":
        plan = DemoPlan("tiny", model or "smollm2-135m-instruct", n_train=8, n_probe_code=4, n_general=6,
                        n_benign=4, epochs=1, batch_size=4, max_len=384, lr=1e-3, warmup_steps=0, lora_rank=4,
                        lora_alpha=8.0, monitor_every=1, probe_batch=8, probe_max_len=512, probe_bucket=128,
                        persona_max_new_tokens=4, persona_questions=2, interleave_ratio=0.25)
    elif scale == "paper":
        # Paper recipe (configs/paper): Qwen2.5-7B-Instruct, rs-LoRA r32 a64, lr 1e-4, 1 epoch, 2048 tokens,
        # batch 4 x 4 accumulation, bf16, with the LLM judge on the general and in-domain questions.
        plan = DemoPlan("paper", model or "Qwen/Qwen2.5-7B-Instruct", n_train=1200, n_probe_code=200,
                        n_benign=200, epochs=1, batch_size=4, max_len=2048, lr=1e-4, warmup_steps=5,
                        dtype="bfloat16", monitor_every=50, probe_batch=32, probe_max_len=1024, probe_bucket=64,
                        persona_max_new_tokens=200, persona_questions=None, judge=True)
    else:
        raise ValueError(f"demo scale must be cpu, tiny or paper, got {scale!r}")
    if methods is not None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown demo method(s) {unknown}; known: {', '.join(METHODS)}")
        if "interleave_pp" in methods and "none" not in methods:
            methods = ("none", *methods)  # Interleaving++ scores the pool with the no-defense model
        plan = dataclasses.replace(plan, methods=tuple(methods))
    return dataclasses.replace(plan, **overrides) if overrides else plan
