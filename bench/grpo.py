"""One GRPO step, emajax vs TRL's ``GRPOTrainer`` (transformers + PEFT): the ``grpo`` op of ``python -m bench``.

    python -m bench --ops grpo --stacks emajax-bf16 torch-fp32 torch-bf16 --batch 8 --group 4 --new-tokens 128

A step is what each library does per optimiser step: sample ``group`` completions of each of ``batch``
prompts (temperature 0.8, top-p 0.9, exactly ``new_tokens`` each: EOS is held back in both stacks so the
work is identical), score them with the same reward, group-normalise the advantages and take one
clipped-ratio policy-gradient update (one update per rollout batch, token-level loss, no KL: TRL's
defaults with ``beta=0``), LoRA r = ``rank``, alpha = 2r on all seven projections, AdamW. The prompts are the
bench's chat questions rendered with the model's chat template (plain text for a template-less model).

Peer rows (TRL as a user tuning it for speed would run it; TRL's own defaults differ in both):

* ``torch-fp32``: fp32 weights, no autocast (``bf16=False``).
* ``torch-bf16``: bf16-*loaded* weights (``model_init_kwargs={"dtype": bfloat16}``) with TRL's ``bf16=True``
  (autocast; PEFT keeps the LoRA adapters in fp32). TRL's ``bf16=True`` on its own keeps fp32 weights and
  casts them under autocast in every forward; bf16-loaded weights spare that cast and half the weight memory.
* Gradient checkpointing follows ``--remat`` (``none``, the bench's default: off), the same setting as emajax's
  step; TRL turns it on by default, which recomputes every block's forward in the backward pass.

Reported per stack: ``seconds`` (median step), ``rollout_s`` (sampling + rewards + advantages: TRL's
``_generate_and_score_completions``) and ``update_s`` (the rest of the step), each the median over the
timed steps; emajax's first step (compiles) is ``first_s``. ``cpu_s``, ``rollout_cpu_s`` and ``update_cpu_s`` are
the same splits in CPU seconds of the worker process (all its threads; ``time.process_time``): on a shared
machine the wall times grow with other jobs' load, the CPU seconds a step consumes much less so (threads
that spin while waiting count in them).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.generate import QUESTIONS
from bench.harness import Spec, current_rss_mb

TEMPERATURE, TOP_P, LR = 0.8, 0.9, 1e-5
# per step: wall clock, then the worker process's CPU seconds (module doc)
STEP_SPLITS = ("seconds", "rollout_s", "update_s", "cpu_s", "rollout_cpu_s", "update_cpu_s")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reward(completion: str) -> float:
    """A cheap deterministic reward with spread within groups (its value does not change the work)."""
    return float(completion.count("e") % 5)


def prompt_texts(batch: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]


def _medians(steps: list[dict[str, float]]) -> dict[str, Any]:
    out = {k: statistics.median(s[k] for s in steps) for k in STEP_SPLITS}
    return {**out, "min_s": min(s["seconds"] for s in steps), "runs_s": [s["seconds"] for s in steps]}


def emajax_step(spec: Spec) -> dict[str, Any]:
    import jax
    import numpy as np

    from emajax.chat import render_chat
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig
    from emajax.models.sharding import make_mesh
    from emajax.rl.advantages import group_advantages
    from emajax.rl.rollout import sample, update_batch
    from emajax.rl.step import RlStepSpec, compile_rl_step
    from emajax.train.config import OptimCfg
    from emajax.train.mesh import accum_batch_sharding, put_global
    from emajax.train.optim import make_optimizer
    from emajax.train.state import create_state
    from jax.sharding import NamedSharding, PartitionSpec as P

    loaded = load_model(spec.model_dir, dtype=spec.dtype, param_dtype="float32", remat=spec.remat,
                        lora=LoraConfig(rank=spec.rank, alpha=2.0 * spec.rank), seed=spec.seed)
    tok = loaded.tokenizer
    rss_loaded = current_rss_mb()
    prompts = []
    for q in prompt_texts(spec.batch):
        text = render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True) \
            if getattr(tok, "chat_template", None) else q
        prompts.append(np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimCfg(lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0), 1000)
    rl_spec = RlStepSpec(lora=True, log_kl=False)
    graphdef, state = create_state(loaded.model, lora=True, tx=tx, mesh=mesh, need_ref=False, seed=spec.seed)
    del loaded
    step_fn = compile_rl_step(graphdef, rl_spec, tx, schedule, state, mesh)
    rows = spec.batch * spec.group
    bsh, ash = accum_batch_sharding(mesh), NamedSharding(mesh, P(None, ("data", "fsdp")))
    box: dict[str, Any] = {"state": state, "i": 0}

    def once() -> dict[str, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        comps = sample(graphdef, box["state"], tok, prompts, group_size=spec.group, max_new_tokens=spec.new_tokens,
                       temperature=TEMPERATURE, top_p=TOP_P, seed=box["i"], eos_ids=[])
        r = np.asarray([reward(t) for t in tok.batch_decode(comps, skip_special_tokens=True)], np.float32)
        adv, _ = group_advantages(r, spec.group)
        hb = update_batch(prompts, comps, spec.group, rows, min_bucket=64, max_len=4096, pad_id=0)
        batch = {k: put_global(v, bsh) for k, v in hb._asdict().items()}
        batch["advantages"] = put_global(np.asarray(adv, np.float32).reshape(1, rows), ash)
        t1, c1 = time.perf_counter(), time.process_time()
        box["state"], m = step_fn(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        t2, c2 = time.perf_counter(), time.process_time()
        box["i"] += 1
        return {"seconds": t2 - t0, "rollout_s": t1 - t0, "update_s": t2 - t1,
                "cpu_s": c2 - c0, "rollout_cpu_s": c1 - c0, "update_cpu_s": c2 - c1}

    first = once()
    for _ in range(max(spec.warmup - 1, 0)):
        once()
    res = _medians([once() for _ in range(max(spec.runs, 1))])
    return {**res, "first_s": first["seconds"], "compile_s": max(first["seconds"] - res["seconds"], 0.0),
            "rows": rows, "prompt_tokens": [len(p) for p in prompts], "rss_after_load_mb": rss_loaded}


def trl_precision(spec: Spec) -> dict[str, Any]:
    """GRPOConfig fields for the peer row of ``spec``: the weights' dtype, autocast, and gradient checkpointing
    as emajax's ``remat`` (see module doc)."""
    bf16 = spec.dtype == "bfloat16"
    return {"bf16": bf16, "model_init_kwargs": {"dtype": "bfloat16" if bf16 else "float32"},
            "gradient_checkpointing": spec.remat != "none"}


def trainer_settings(model: Any) -> dict[str, Any]:
    """What the trainer's model really runs with (not what was asked): the frozen and the trained weights'
    dtypes and whether gradient checkpointing is on."""
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    trained = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    return {"frozen_dtype": ",".join(sorted(frozen)), "trained_dtype": ",".join(sorted(trained)),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


def trl_step(spec: Spec) -> dict[str, Any]:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec.seed)
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat = getattr(tok, "chat_template", None) is not None
    total = 1 + max(spec.warmup - 1, 0) + max(spec.runs, 1)
    qs = prompt_texts(spec.batch) * total
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}] if chat else q} for q in qs])
    rows = spec.batch * spec.group

    def reward_fn(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(t) for t in texts]

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
            num_generations=spec.group, max_completion_length=spec.new_tokens, temperature=TEMPERATURE, top_p=TOP_P,
            generation_kwargs={"min_new_tokens": spec.new_tokens}, learning_rate=LR, lr_scheduler_type="constant",
            weight_decay=0.0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
            max_steps=total, logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False,
            use_cpu=spec.device == "cpu", seed=spec.seed, disable_dropout=True, **trl_precision(spec))
        lora = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=spec.model_dir, reward_funcs=[reward_fn], args=args, train_dataset=ds,
                              processing_class=tok, peft_config=lora)
        rss_loaded = current_rss_mb()
        steps: list[dict[str, float]] = []
        gen = trainer._generate_and_score_completions
        cur: dict[str, float] = {}

        def timed_gen(*a: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            out_ = gen(*a, **kw)
            cur["rollout_s"] = cur.get("rollout_s", 0.0) + time.perf_counter() - t0
            cur["rollout_cpu_s"] = cur.get("rollout_cpu_s", 0.0) + time.process_time() - c0
            return out_

        trainer._generate_and_score_completions = timed_gen

        class Clock(TrainerCallback):
            def on_step_begin(self, *_, **__):
                cur.clear()
                cur["t0"], cur["c0"] = time.perf_counter(), time.process_time()

            def on_step_end(self, *_, **__):
                sec, cpu = time.perf_counter() - cur["t0"], time.process_time() - cur["c0"]
                steps.append({"seconds": sec, "rollout_s": cur.get("rollout_s", 0.0),
                              "update_s": sec - cur.get("rollout_s", 0.0), "cpu_s": cpu,
                              "rollout_cpu_s": cur.get("rollout_cpu_s", 0.0),
                              "update_cpu_s": cpu - cur.get("rollout_cpu_s", 0.0)})

        trainer.add_callback(Clock())
        trainer.train()
        ran_with = trainer_settings(trainer.model)  # Trainer.train turns checkpointing on: read it after
    timed = steps[1 + max(spec.warmup - 1, 0):]
    return {**_medians(timed), "first_s": steps[0]["seconds"], "compile_s": None, "rows": rows,
            "rss_after_load_mb": rss_loaded, "torch_threads": torch.get_num_threads(),
            "mode": "bf16 weights + autocast" if spec.dtype == "bfloat16" else "fp32", **ran_with}
