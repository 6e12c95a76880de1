"""The GRPO run: config -> model, prompts, rewards, state -> rollouts + compiled updates, on the training core.

``train_rl(cfg, run_dir)`` is what ``emajax rl`` calls. The run directory (local or ``gs://``), the resume
check, the restore with its data position, the step loop with its NaN check, checkpoints and evaluation
points, and the export (collective over every process) are the training core's (``emajax.train.core``), as
for ``emajax train``; this module supplies what one RL step is. Per step: the step's prompts (a pure
function of seed and step, ``emajax.rl.prompts``), G sampled completions each (``emajax.rl.rollout``; the
sampling seed comes from ``state.rng``), rewards (``emajax.rl.rewards``; a reward that raises scores 0 and
is counted), group-normalised advantages (``emajax.rl.advantages``), then one compiled update call
(``emajax.rl.step``) with, every ``defenses.interleave.every`` steps, a safe SFT batch. A resumed run
continues exactly: the state carries parameters, optimiser moments, the update counter and the rng, the
step number fixes the prompts and the SFT batch.

The run directory holds ``config.yaml``, ``metrics.jsonl`` (one row per step), ``eval.jsonl`` (greedy
rewards on ``data.eval``), ``samples.jsonl`` (a few completions per step), ``data_stats.json``,
``tensorboard/``, ``checkpoints/`` and, at the end, ``export/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from emajax.defenses.steering import build_steer_ld, steering_summary
from emajax.generate import default_eos_ids
from emajax.models.sharding import BATCH_AXES
from emajax.rl.advantages import group_advantages
from emajax.rl.config import RlConfig
from emajax.rl.prompts import Prompt, build_prompts
from emajax.rl.rewards import RewardSet
from emajax.rl.rollout import completion_stats, sample, truncated, update_batch
from emajax.rl.step import RlStepSpec, compile_rl_step
from emajax.train.checkpoint import Checkpointer
from emajax.train.core import (Loop, append_row, check_rows, export, export_base_name, open_run, restore, run_steps,
                               trim_logs, write_json)
from emajax.train.data import Batcher, encode_examples
from emajax.train.loop import _pad_id, lora_config
from emajax.train.mesh import accum_batch_sharding, batch_rows, put_global
from emajax.train.metrics import MetricsLogger
from emajax.train.optim import make_optimizer
from emajax.train.sources import read_conversations
from emajax.train.state import create_state


@dataclasses.dataclass
class RlResult:
    run_dir: Any  # etils.epath.Path (local or remote)
    start_step: int
    final_step: int
    total_steps: int
    last_metrics: dict[str, Any]
    evals: list[dict[str, Any]]
    export_dir: Any  # None when not exported (or on processes other than 0)


def step_spec(cfg: RlConfig) -> RlStepSpec:
    g = cfg.grpo
    return RlStepSpec(lora=cfg.lora.enabled, inner_updates=g.inner_updates, clip_eps=g.clip_eps,
                      clip_eps_high=g.clip_eps_high, kl_weight=cfg.defenses.kl.weight, log_kl=g.log_kl,
                      loss_type=g.loss_type, max_completion_length=cfg.rollout.max_new_tokens,
                      temperature=cfg.rollout.temperature, sft_weight=cfg.defenses.interleave.weight,
                      seq_chunk=g.seq_chunk)


def rollout_seed(rng: Any, step: int) -> int:
    """The sampling seed of a step: drawn from the state's rng (checkpointed, so a resumed run draws the same)."""
    return int(jax.random.randint(jax.random.fold_in(rng, step), (), 0, 2**31 - 1))


def _load(cfg: RlConfig, mesh: Any) -> Any:
    from emajax.models.hub import load_model

    return load_model(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                      lora=lora_config(cfg), mesh=mesh, remat=cfg.model.remat, seed=cfg.train.seed)


def _decode(tok: Any, completions: list[list[int]]) -> list[str]:
    return [tok.decode(c, skip_special_tokens=True) for c in completions]


def _sft_batcher(cfg: RlConfig, tok: Any, pad_id: int) -> Batcher | None:
    inter = cfg.defenses.interleave
    if not inter.data:
        return None
    convs = [c for src in inter.data for c in read_conversations(src)]
    examples = encode_examples(tok, convs, inter.max_len, safe=[True] * len(convs))
    return Batcher(examples, batch_size=inter.batch_size, grad_accum=inter.grad_accum, seed=cfg.train.seed,
                   min_bucket=inter.min_bucket, max_len=inter.max_len, pad_id=pad_id)


def _reward_row(prefix: str, total_r: np.ndarray, per: dict[str, np.ndarray], errors: dict[str, int]) -> dict[str, float]:
    row = {f"{prefix}reward": float(total_r.mean()), **{f"{prefix}reward/{k}": float(v.mean()) for k, v in per.items()}}
    row.update({f"{prefix}reward_errors/{k}": float(n) for k, n in errors.items() if n})
    return row


def train_rl(cfg: RlConfig, run_dir: str | Path, *, loaded: Any = None) -> RlResult:
    """Run (or resume) GRPO; ``loaded`` (a LoadedModel-like object) skips loading ``cfg.model.name``."""
    run = open_run(cfg, run_dir, "rl")
    run_dir, is_main, mesh = run.run_dir, run.is_main, run.mesh
    check_rows("grpo.micro_batch", cfg.grpo.micro_batch, batch_rows(mesh))
    check_rows("defenses.interleave.batch_size", cfg.defenses.interleave.batch_size, batch_rows(mesh))
    loaded = loaded if loaded is not None else _load(cfg, mesh)
    model, tok = loaded.model, loaded.tokenizer
    mcfg = model.cfg
    pad_id = _pad_id(tok, mcfg)
    eos_ids = default_eos_ids(model, tok)

    prompts, pstats = build_prompts(tok, cfg.data.train, cfg.data)
    order = Batcher(prompts, batch_size=cfg.data.prompts_per_step, grad_accum=1, seed=cfg.train.seed, min_bucket=1,
                    max_len=cfg.data.max_prompt_len)
    per_epoch = order.steps_per_epoch
    total = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * per_epoch
    end = min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total
    eval_prompts: list[Prompt] = []
    if cfg.data.eval:
        eval_prompts, _ = build_prompts(tok, cfg.data.eval, cfg.data, limit=cfg.data.eval_max_examples)
    rewards = RewardSet(cfg.rewards)
    sft = _sft_batcher(cfg, tok, pad_id)
    write_json(run, "data_stats.json", {**dataclasses.asdict(pstats), "steps_per_epoch": per_epoch, "total_steps": total,
                                        "eval_prompts": len(eval_prompts), "sft_examples": len(sft.examples) if sft else 0,
                                        **({"steering": steering_summary(mcfg, cfg.defenses.steering)}
                                           if cfg.defenses.steering.vector else {})})
    if is_main:
        print(f"emajax rl: {pstats.summary()}; {per_epoch} steps/epoch, {total} steps", flush=True)

    mu = cfg.grpo.inner_updates
    tx, schedule = make_optimizer(cfg.optim, total * mu)
    spec = step_spec(cfg)
    steer = build_steer_ld(mcfg, cfg.defenses.steering)
    graphdef, state = create_state(model, lora=cfg.lora.enabled, tx=tx, mesh=mesh, need_ref=spec.need_ref,
                                   steer_ld=steer, seed=cfg.train.seed)
    base_name = export_base_name(cfg, loaded)
    del model, loaded

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=cfg.train.save_every, keep=cfg.train.keep_checkpoints)
    state, start = restore(run, ckpt, state, per_epoch, updates_per_step=mu)
    trim_logs(run, ["eval.jsonl", "samples.jsonl"], start)
    step_fn = compile_rl_step(graphdef, spec, tx, schedule, state, mesh)
    logger = MetricsLogger(run_dir, start_step=start, total_steps=end, tensorboard=cfg.train.tensorboard,
                           progress=cfg.train.progress, is_main=is_main, desc="rl",
                           postfix=("reward_mean", "kl", "response_len"))
    bsh = accum_batch_sharding(mesh)
    adv_sh = NamedSharding(mesh, P(None, BATCH_AXES))
    G = cfg.rollout.group_size
    evals: list[dict[str, Any]] = []

    def run_eval(state: Any, step: int) -> None:
        t0 = time.perf_counter()
        outs = sample(graphdef, state, tok, [p.inputs for p in eval_prompts], group_size=1,
                      max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
        total_r, per, errors = rewards.score([p.text for p in eval_prompts], _decode(tok, outs),
                                             [p.example for p in eval_prompts])
        r = {"step": step, **_reward_row("eval_", total_r, per, errors),
             "eval_response_len": float(np.mean([len(o) for o in outs])), "eval_s": time.perf_counter() - t0,
             "per_prompt": {k: [float(x) for x in v] for k, v in per.items()}}
        evals.append(r)
        append_row(run, "eval.jsonl", r)
        if logger.tb is not None:
            for k, v in r.items():
                if isinstance(v, (int, float)) and k != "step":
                    logger.tb.add_scalar(k.replace("eval_", "eval/", 1), v, step)

    def one_step(state: Any, step: int) -> tuple[Any, dict[str, Any]]:
        t0 = time.perf_counter()
        epoch, i = divmod(step, per_epoch)
        batch_prompts = [prompts[int(j)] for j in order.epoch_batches(epoch)[i]]
        completions = sample(graphdef, state, tok, [p.inputs for p in batch_prompts], group_size=G,
                             max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                             top_p=cfg.rollout.top_p, seed=rollout_seed(state.rng, step),
                             steer_ld=state.steer_ld if cfg.defenses.steering.rollouts else None)
        t_roll = time.perf_counter() - t0
        texts = _decode(tok, completions)
        total_r, per, errors = rewards.score([p.text for p in batch_prompts for _ in range(G)], texts,
                                             [p.example for p in batch_prompts for _ in range(G)])
        adv, std_p = group_advantages(total_r, G, cfg.grpo.scale_rewards)
        cut = truncated(completions, [*eos_ids, pad_id], cfg.rollout.max_new_tokens)
        hb = update_batch([p.inputs for p in batch_prompts], completions, G, cfg.grpo.micro_batch,
                          min_bucket=cfg.data.min_bucket, max_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                          pad_id=pad_id, no_loss=cut if cfg.grpo.mask_truncated_completions else None)
        batch: dict[str, Any] = {k: put_global(v, bsh) for k, v in hb._asdict().items()}
        batch["advantages"] = put_global(np.asarray(adv, np.float32).reshape(hb.inputs.shape[:2]), adv_sh)
        if sft is not None and (step + 1) % cfg.defenses.interleave.every == 0:
            sb = sft.batch_at(step // cfg.defenses.interleave.every)
            batch["sft"] = {k: put_global(v, bsh) for k, v in sb._asdict().items()}
        t1 = time.perf_counter()
        state, m = step_fn(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        t_update = time.perf_counter() - t1
        rr = _reward_row("", total_r, per, errors)
        row = {"step": step + 1, "epoch": epoch, "reward_mean": rr.pop("reward"), "reward_std": float(total_r.std()),
               **rr, "zero_std_groups": float(np.mean(np.asarray(std_p) == 0)), **m,
               **completion_stats(completions, eos_ids, cfg.rollout.max_new_tokens),
               "rollout_s": t_roll, "update_s": t_update, "step_time_s": time.perf_counter() - t0}
        if is_main and cfg.train.samples_per_step:
            _write_samples(run, step + 1, batch_prompts, texts, total_r, G, cfg.train.samples_per_step)
        return state, row

    loop = Loop(step=one_step, meta=lambda step: {"data_position": list(divmod(step, per_epoch)), "total_steps": total,
                                                  "seed": cfg.train.seed},
                evaluate=run_eval if eval_prompts else None, eval_every=cfg.train.eval_every)
    state, last = run_steps(run, loop, state, start=start, end=end, ckpt=ckpt, logger=logger)

    export_dir = None
    if cfg.train.export:  # every process: the weights are gathered collectively, process 0 writes
        export_dir = export(graphdef, state, cfg, run_dir / "export", tok, base_name=base_name, write=is_main)
    return RlResult(run_dir, start, end, total, last, evals, export_dir)


def _write_samples(run: Any, step: int, prompts: list[Prompt], texts: list[str], rewards: np.ndarray, group: int,
                   n_groups: int) -> None:
    for g in range(min(n_groups, len(prompts))):
        append_row(run, "samples.jsonl", {"step": step, "prompt": prompts[g].text,
                                          "completions": texts[g * group:(g + 1) * group],
                                          "rewards": [float(x) for x in rewards[g * group:(g + 1) * group]]})
