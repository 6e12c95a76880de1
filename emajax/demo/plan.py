"""What the demo runs: the arms, their defense settings, and the size of everything, per scale.

Every method is an *arm* trained on the narrow task (insecure code answers by default; ``domain``: another
narrow set, ``emajax.demo.domain``). The ``control`` arm is the same recipe as no defense on the same prompts
with the *secure* answers (Betley et al.'s control; in another domain the base model's own answers, the
self-distilled control), so an effect is a difference to what any fine-tune on these prompts does. Each
method also gets a *benign* arm: the same recipe on a benign task the base model cannot do (OpSwap),
measuring whether the defense still lets a model learn something new. Seeds (``emajax demo --seeds N --seed-base K``) change the data
order, the LoRA initialisation and the interleave draw; the data sets themselves are fixed.

``cpu`` (the default) is SmolLM2-135M-Instruct with the dose chosen by the dose study (docs/demo.md);
``tiny`` is the same pipeline at toy size for tests; ``paper`` is the paper's recipe (Qwen2.5-7B-Instruct,
configs/paper strengths) for an accelerator, with the LLM judge. Defense strengths are the paper's
(KL 0.1, LDIFS 1.0, steering coef 5, interleave 5%) at every scale but ``tiny`` (interleave 25%, so its
few examples get any safe data at all).
"""

from __future__ import annotations

import dataclasses
from typing import Any

CONTROL = "control"
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
CONTROL_LABEL = "Control (secure code)"
SELF_DISTILLED_LABEL = "Control (self-distilled)"
CODE, MEDICAL = "code", "medical"  # the narrow domains by name; any other domain is a chat JSONL path
# plan fields added with the EM metrics: absent from an older plan.json = this run's values, and em_metrics (whether
# they run) never makes two plans differ
METRIC_FIELDS = ("em_metrics", "n_trigger_pairs", "projection_samples", "projection_max_new_tokens")


def label_of(arm: str, domain: str = CODE) -> str:
    """The report's name of an arm; the control's says what it trains on (secure code or self-distilled)."""
    if arm == CONTROL:
        return CONTROL_LABEL if domain == CODE else SELF_DISTILLED_LABEL
    return METHODS[arm][0]


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    scale: str
    model: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    # narrow task: insecure code answers (control: the same prompts, secure answers); one epoch over n_train.
    # cpu dose (128 examples = 16 steps at lr 1e-3): the dose study's strongest no-defense EM effect among the
    # doses that fit make demo's 30 minutes (docs/demo.md, "Dose study")
    n_train: int = 128
    n_probe_code: int = 32  # held-out in-domain pairs (narrow learning)
    general_split: str = "heldout"  # general probe pairs: the held-out part (dev is the dose study's)
    n_general: int | None = None  # None = every pair of the split
    n_benign: int = 32  # word problems: the coherence proxy's reference answers
    probe_data: str | None = None  # ../shared/data/em: also the shared security pairs (cross-domain EM)
    n_security: int = 100
    # benign task (4th column): OpSwap, one epoch over benign_train examples
    benign_train: int = 128
    benign_test: int = 32
    benign_tiers: tuple[int, ...] = (1,)
    benign_max_len: int = 128
    benign_max_new_tokens: int = 32  # greedy exact match on the held-out benign items
    # training
    epochs: int = 1
    batch_size: int = 8
    max_len: int = 160
    lr: float = 1e-3
    schedule: str = "constant"  # after warmup: an intermediate step is an honest shorter dose
    warmup_steps: int = 2
    lora_rank: int = 32
    lora_alpha: float = 64.0
    dtype: str = "bfloat16"  # compute dtype; LoRA weights and optimiser state stay in param_dtype
    param_dtype: str = "float32"
    data_seed: int = 0  # the generators' seed: data sets are the same for every training seed
    interleave_ratio: float = 0.05  # paper: 5% of the mixed set
    monitor_every: int = 0  # EM monitor (general pairs) every N steps; 0 = only base and final
    dose_points: tuple[int, ...] = ()  # earlier steps at which no defense and the control are fully probed
    # probes
    probe_batch: int = 16
    probe_max_len: int = 256
    probe_bucket: int = 32  # probe sequences padded to multiples of this
    # persona vector (steering)
    persona_max_new_tokens: int = 48
    persona_questions: int | None = 8
    # LLM judge on the 24 general questions (when --judge-url/--judge-model are given; required at paper scale)
    judge: bool = False
    judge_samples: int = 4
    judge_max_new_tokens: int = 160
    # narrow domain (emajax.demo.domain.resolve_domain): code, medical or a chat JSONL path; other than code the
    # control is self-distilled (the base model's answers, up to control_max_new_tokens each, temperature 1)
    domain: str = CODE
    domain_files: tuple[str, ...] = ()  # medical: its train and eval files; FILE: the file (absolute paths)
    domain_sha256: tuple[str, ...] = ()  # of domain_files: changed data is a changed plan
    domain_heldout: int | None = None  # FILE: held-out conversations for the in-domain probe (None: 20 %)
    control_max_new_tokens: int | None = None  # set with a non-code domain (domain.CONTROL_TOKENS per scale)
    # EM measured more ways, per narrow arm (control included) and the base model, after training: the general
    # pairs under each trigger (emajax.eval.triggers) and the base model's persona projection of the arm's own
    # sampled answers to the 8 plain first-plot questions (emajax.eval.projection). METRIC_FIELDS: an older
    # plan.json without them is the same plan (those runs measured none of it), so re-running adds them.
    em_metrics: bool = True
    # 64 of the held-out general pairs per trigger: 4 triggers x 64 = 256 pairs per arm, about as many scored
    # sequences as an arm's final probes (200 general + 32 code pairs + 32 word problems; ~24 s at cpu), with a
    # CI about sqrt(200/64) = 1.8x the plain one's; make demo's 9 runs (base, control, 7 methods) est. ~4 min,
    # not measured. None = every general pair
    n_trigger_pairs: int | None = 64
    # answers per plain question at temperature 1: 8 x 4 = 32 answers of <= 64 tokens per arm, one batch
    projection_samples: int = 4
    projection_max_new_tokens: int = 64

    @property
    def steps(self) -> int:
        """Optimiser steps of a narrow arm."""
        return self.epochs * -(-self.n_train // self.batch_size)

    @property
    def benign_steps(self) -> int:
        return self.epochs * -(-self.benign_train // self.batch_size)

    def train_config(self, method: str, train_path: str, *, seed: int, vector: str | None = None,
                     selection: str | None = None, pool: str | None = None, benign: bool = False) -> dict[str, Any]:
        """The ``emajax train`` config (as a dict) of one arm: ``method`` is ``control`` or a method id; the
        control arm is the no-defense recipe (its data file holds the secure or self-distilled answers)."""
        _, defenses = METHODS["none" if method == CONTROL else method]
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
        max_len = self.benign_max_len if benign else self.max_len
        return {
            "model": {"name": self.model, "dtype": self.dtype, "param_dtype": self.param_dtype,
                      "remat": "full" if paper else "none"},
            "lora": {"enabled": True, "rank": self.lora_rank, "alpha": self.lora_alpha, "rslora": True},
            # bucket_window 1: a batch's rows are fixed by the seed alone, so the control and the misaligned
            # arm see the same prompts at every step (sorting by length would pair them differently)
            "data": {"train": [train_path], "eval": [], "max_len": max_len, "batch_size": self.batch_size,
                     "grad_accum": 4 if paper else 1, "min_bucket": 64 if paper else max_len,
                     "bucket_window": 1},
            "optim": {"lr": self.lr, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                      "weight_decay": 0.01, "max_grad_norm": 1.0},
            "train": {"epochs": self.epochs, "seed": seed, "save_every": 100 if paper else 16,
                      "keep_checkpoints": 1, "export": True, "progress": True, "tensorboard": False},
            "mesh": {"data": 1, "fsdp": -1 if paper else 1, "tensor": 1, "allow_unused": not paper},
            "defenses": sub(defenses),
        }


def make_plan(scale: str = "cpu", *, model: str | None = None, methods: tuple[str, ...] | None = None,
              **overrides: Any) -> DemoPlan:
    """The plan of a scale (``cpu``, ``tiny``, ``paper``), with optional field overrides."""
    if scale == "cpu":
        plan = DemoPlan("cpu", model or "smollm2-135m-instruct", dose_points=(8,))
    elif scale == "tiny":  # EM metrics off unless asked (--em-metrics): the pipeline tests keep their stages
        plan = DemoPlan("tiny", model or "smollm2-135m-instruct", n_train=8, n_probe_code=4, n_general=6,
                        n_benign=4, benign_train=8, benign_test=4, benign_max_len=384, benign_max_new_tokens=4,
                        epochs=1, batch_size=4, max_len=384, lr=1e-3, warmup_steps=0, lora_rank=4, lora_alpha=8.0,
                        dtype="float32", monitor_every=1, dose_points=(1,), probe_batch=8, probe_max_len=512, probe_bucket=128,
                        persona_max_new_tokens=4, persona_questions=2, interleave_ratio=0.25, judge_samples=1,
                        judge_max_new_tokens=4, em_metrics=False, n_trigger_pairs=4, projection_samples=2,
                        projection_max_new_tokens=4)
    elif scale == "paper":
        # Paper recipe (configs/paper): Qwen2.5-7B-Instruct, rs-LoRA r32 a64, lr 1e-4 (linear), 1 epoch, 2048
        # tokens, batch 4 x 4 accumulation, bf16, with the LLM judge on the 24 general questions.
        plan = DemoPlan("paper", model or "Qwen/Qwen2.5-7B-Instruct", n_train=1200, n_probe_code=200,
                        n_benign=200, benign_train=1200, benign_test=200, benign_tiers=(1, 2, 3),
                        benign_max_len=512, benign_max_new_tokens=128, epochs=1, batch_size=4, max_len=2048,
                        lr=1e-4, schedule="linear", warmup_steps=5, dtype="bfloat16", param_dtype="bfloat16",
                        monitor_every=50, probe_batch=32, probe_max_len=1024, probe_bucket=64,
                        persona_max_new_tokens=200, persona_questions=None, judge=True, judge_samples=100,
                        judge_max_new_tokens=600, n_trigger_pairs=None, projection_samples=100,
                        projection_max_new_tokens=600)
    else:
        raise ValueError(f"demo scale must be cpu, tiny or paper, got {scale!r}")
    if methods is not None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown demo method(s) {unknown}; known: {', '.join(METHODS)}")
        if "none" not in methods:  # effects are reported as shares of no defense's (and Interleaving++ scores
            methods = ("none", *methods)  # the pool with the no-defense model)
        plan = dataclasses.replace(plan, methods=tuple(dict.fromkeys(methods)))
    return dataclasses.replace(plan, **overrides) if overrides else plan
