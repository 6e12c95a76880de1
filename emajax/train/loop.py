"""The training run: config -> model, data, state -> compiled steps -> checkpoints, metrics, export.

``train(cfg, run_dir)`` is what ``emajax train`` calls; the run directory, resume check, step loop and
export are the training core's (``emajax.train.core``), shared with ``emajax rl``. Re-running with the same run directory
resumes from the latest finalised checkpoint: the step number fixes the next batch (the data
order is a function of seed and epoch), and the restored state carries optimiser moments and rng.
The run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``eval.jsonl``,
``data_stats.json``, ``tensorboard/``, ``checkpoints/`` and, at the end, ``export/``. It may be remote
(``gs://bucket/run``: an ``etils.epath.Path`` throughout, as orbax takes it). With several processes
(``jax.distributed``) every process runs this same function; process 0 alone writes the files,
orbax checkpoints are written by all of them, and export gathers sharded weights collectively.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from emajax.defenses.steering import build_steer_ld, steering_summary
from emajax.losses import ldifs_layers
from emajax.models.lora import LoraConfig
from emajax.paths import write_text
from emajax.train.checkpoint import Checkpointer
from emajax.train.config import Config
from emajax.train.core import (Loop, append_row, check_rows, export, export_base_name, open_run, restore, run_steps,
                               trim_logs, write_json)
from emajax.train.data import Batcher, build_train_examples, encode_examples, eval_batches
from emajax.train.mesh import accum_batch_sharding, batch_rows, put_global
from emajax.train.metrics import MetricsLogger
from emajax.train.optim import make_optimizer
from emajax.train.sources import read_conversations
from emajax.train.state import create_state
from emajax.train.step import StepSpec, compile_train_step, make_eval_fn

@dataclasses.dataclass
class RunResult:
    run_dir: Any  # etils.epath.Path (local or remote)
    start_step: int
    final_step: int
    total_steps: int
    last_metrics: dict[str, Any]
    evals: list[dict[str, Any]]
    export_dir: Any  # etils.epath.Path, None when not exported (or on processes other than 0)
    data_stats: dict[str, Any]


def lora_config(cfg: Config) -> LoraConfig | None:
    """The model's adapters (their dtype defaults to model.param_dtype); None = full fine-tuning."""
    if not cfg.lora.enabled:
        return None
    return dataclasses.replace(cfg.lora, dtype=cfg.lora.dtype or cfg.model.param_dtype)


def _load(cfg: Config, mesh: Any) -> Any:
    from emajax.models.hub import load_model

    return load_model(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                      lora=lora_config(cfg), mesh=mesh, remat=cfg.model.remat, seed=cfg.train.seed)


def step_spec(cfg: Config, num_layers: int) -> StepSpec:
    d = cfg.defenses
    layers = tuple(d.ldifs.layers) if d.ldifs.layers else (ldifs_layers(num_layers, min(5, num_layers))
                                                          if d.ldifs.weight > 0 else ())
    for l in layers:
        if not 1 <= l <= num_layers:
            raise ValueError(f"defenses.ldifs.layers: layer {l} outside 1..{num_layers}")
    return StepSpec(lora=cfg.lora.enabled, kl_weight=d.kl.weight, kl_reverse=d.kl.reverse,
                    ldifs_weight=d.ldifs.weight, ldifs_layers=layers, seq_chunk=cfg.loss.seq_chunk,
                    kl_tokens=d.kl.tokens, normalize=cfg.loss.normalize)


def _pad_id(tokenizer: Any, model_cfg: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), model_cfg.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if v is not None:
            return int(v)
    return 0


def evaluate(eval_fn: Any, state: Any, examples: list, cfg: Config, mesh: Any, pad_id: int) -> dict[str, float]:
    """Mean answer-token NLL over the eval examples (adapters on, no steering, no inoculation)."""
    sh = accum_batch_sharding(mesh)
    bs = cfg.data.eval_batch_size
    bs = -(-bs // batch_rows(mesh)) * batch_rows(mesh)
    tot, cnt = 0.0, 0.0
    for b in eval_batches(examples, bs, cfg.data.min_bucket, cfg.data.max_len, pad_id):
        arrs = {k: put_global(v, sh) for k, v in b._asdict().items()}
        s, c = eval_fn(state.trainable, state.frozen, arrs)
        tot += float(s)
        cnt += float(c)
    return {"eval_nll": tot / max(cnt, 1.0), "eval_tokens": int(cnt)}


def train(cfg: Config, run_dir: str | Path, *, loaded: Any = None, callback: Any = None) -> RunResult:
    """Run (or resume) training; ``loaded`` (a LoadedModel-like object with ``model``, ``tokenizer``)
    skips loading from ``cfg.model.name`` (tests, notebooks). ``callback(step, graphdef, state)``, when
    given, runs after every optimiser step (and at step 0 of a fresh run), e.g. an EM probe monitor
    (``emajax.eval.probes.ProbeRunner.monitor``) that decides itself how often to measure."""
    run = open_run(cfg, run_dir, "train")
    run_dir, is_main, mesh = run.run_dir, run.is_main, run.mesh
    check_rows("data.batch_size", cfg.data.batch_size, batch_rows(mesh))
    loaded = loaded if loaded is not None else _load(cfg, mesh)
    model, tok = loaded.model, loaded.tokenizer
    mcfg = model.cfg
    pad_id = _pad_id(tok, mcfg)

    examples, stats = build_train_examples(tok, cfg.data, cfg.defenses, cfg.train.seed)
    batcher = Batcher(examples, batch_size=cfg.data.batch_size, grad_accum=cfg.data.grad_accum, seed=cfg.train.seed,
                      min_bucket=cfg.data.min_bucket, max_len=cfg.data.max_len, bucket_window=cfg.data.bucket_window,
                      pad_id=pad_id)
    per_epoch = batcher.steps_per_epoch
    total = cfg.train.epochs * per_epoch
    end = min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total
    stats_d = {**dataclasses.asdict(stats), "steps_per_epoch": per_epoch, "total_steps": total}
    if cfg.defenses.steering.vector:
        stats_d["steering"] = steering_summary(mcfg, cfg.defenses.steering)
    write_json(run, "data_stats.json", stats_d)
    if is_main:
        print(f"emajax train: {stats.summary()}; {per_epoch} steps/epoch, {total} steps", flush=True)

    eval_ex: list = []
    for src in cfg.data.eval:
        eval_ex += encode_examples(tok, read_conversations(src), cfg.data.max_len)  # plain: no inoculation
    if cfg.data.eval_max_examples:
        eval_ex = eval_ex[: cfg.data.eval_max_examples]

    tx, schedule = make_optimizer(cfg.optim, total)
    spec = step_spec(cfg, mcfg.num_layers)
    steer = build_steer_ld(mcfg, cfg.defenses.steering)
    graphdef, state = create_state(model, lora=cfg.lora.enabled, tx=tx, mesh=mesh, need_ref=spec.need_ref,
                                   steer_ld=steer, seed=cfg.train.seed)
    base_name = export_base_name(cfg, loaded)
    del model, loaded  # the state owns the weights now

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=cfg.train.save_every, keep=cfg.train.keep_checkpoints)
    state, start = restore(run, ckpt, state, per_epoch)
    trim_logs(run, ["eval.jsonl"], start)
    step_fn = compile_train_step(graphdef, spec, tx, schedule, state, mesh)
    eval_fn = make_eval_fn(graphdef, cfg.loss.seq_chunk, mesh) if eval_ex else None
    logger = MetricsLogger(run_dir, start_step=start, total_steps=end, tensorboard=cfg.train.tensorboard,
                           progress=cfg.train.progress, is_main=is_main)
    evals: list[dict[str, Any]] = []
    bsh = accum_batch_sharding(mesh)

    def run_eval(state: Any, step: int) -> None:
        r = {"step": step, **evaluate(eval_fn, state, eval_ex, cfg, mesh, pad_id)}
        evals.append(r)
        append_row(run, "eval.jsonl", r)
        if logger.tb is not None:
            logger.tb.add_scalar("eval/nll", r["eval_nll"], step)

    def one_step(state: Any, step: int) -> tuple[Any, dict[str, Any]]:
        hb = batcher.batch_at(step)
        batch = {k: put_global(v, bsh) for k, v in hb._asdict().items()}
        t0 = time.perf_counter()
        state, m = step_fn(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.perf_counter() - t0
        return state, {"step": step + 1, "epoch": step // per_epoch, **m, "tokens": int(hb.attn_mask.sum()),
                       "tokens_per_s": float(hb.attn_mask.sum()) / dt, "step_time_s": dt}

    loop = Loop(step=one_step, meta=lambda step: {"data_position": list(divmod(step, per_epoch)), "total_steps": total,
                                                  "seed": cfg.train.seed},
                evaluate=run_eval if eval_fn is not None else None, eval_every=cfg.train.eval_every,
                callbacks=() if callback is None else (lambda step, st: callback(step, graphdef, st),))
    state, last = run_steps(run, loop, state, start=start, end=end, ckpt=ckpt, logger=logger)

    if cfg.defenses.safelora.base_model and cfg.lora.enabled and cfg.train.export:
        state = safelora_state(graphdef, state, cfg, mesh, run_dir, is_main)
    export_dir = None
    if cfg.train.export:  # every process: the weights are gathered collectively, process 0 writes
        export_dir = export(graphdef, state, cfg, run_dir / "export", tok, base_name=base_name, write=is_main)
    return RunResult(run_dir, start, end, total, last, evals, export_dir, stats_d)


def safelora_state(graphdef: Any, state: Any, cfg: Config, mesh: Any, run_dir: Any, is_main: bool) -> Any:
    """The trained state with SafeLoRA applied to its LoRA B matrices (``defenses.safelora``), for export;
    every per-layer decision goes to ``safelora.json``. Checkpoints keep the unprojected adapter."""
    from emajax.defenses.safelora import apply_safelora, summarize
    from emajax.models.hub import load_model

    sl = cfg.defenses.safelora
    base = load_model(sl.base_model, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh).model
    model = nnx.merge(graphdef, state.trainable, state.frozen)
    records = apply_safelora(model, base, sl.threshold)
    del base
    summary = summarize(records)
    if is_main:
        write_text(run_dir / "safelora.json", json.dumps({"base_model": sl.base_model, "aligned_model": cfg.model.name,
                                                          "threshold": sl.threshold, **summary, "layers": records},
                                                         indent=1))
        print(f"emajax train: SafeLoRA projected {summary['projected']} of {summary['total']} adapted matrices "
              f"(threshold {sl.threshold}) -> {run_dir / 'safelora.json'}", flush=True)
    _, trainable, _ = nnx.split(model, nnx.LoRAParam, ...)
    return state._replace(trainable=trainable)
