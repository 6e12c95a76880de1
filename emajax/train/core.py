"""The training core that `emajax train`, `emajax rl` and the demo's arms share: run directory, resume, step loop.

A run is: ``open_run`` (jax.distributed start, the run directory through ``emajax.paths`` (local or
``gs://``), the one resume check, ``config.yaml``, the mesh), a state from ``emajax.train.state``,
``restore`` (the latest finalised checkpoint and the data position it must match), ``run_steps`` (the step
loop with its hooks: metrics row, NaN check, periodic and forced final checkpoints, evaluation at the start,
every ``eval_every`` steps and at the end, per-step callbacks) and ``export`` (collective: every process
calls it, process 0 writes). What a step *is* (an SFT batch, a GRPO rollout + update) is the verb's
``step`` function; the compiled update inside it uses ``emajax.train.update`` (one accumulation, one
optimiser step).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

from emajax import atomic
from emajax.paths import is_remote, run_path, write_text
from emajax.train.checkpoint import Checkpointer
from emajax.train.mesh import build_mesh, maybe_initialize_distributed
from emajax.train.metrics import MetricsLogger, read_metrics

# Keys that may change between the run that wrote a checkpoint and the one resuming it (SFT's and GRPO's).
RESUME_FREE = frozenset({
    "train.max_steps", "train.progress", "train.tensorboard", "train.export", "train.eval_every", "train.save_every",
    "train.keep_checkpoints", "train.samples_per_step", "out", "data.eval", "data.eval_batch_size",
    "data.eval_max_examples", "distributed", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn_data",
    "mesh.dcn_fsdp", "mesh.allow_unused",
    "defenses.safelora.base_model", "defenses.safelora.threshold"})  # safelora: applied at export


@dataclasses.dataclass
class Run:
    """An opened run directory: where it is (``etils.epath.Path``), whether this process writes files, the mesh."""

    run_dir: Any
    is_main: bool
    mesh: Any
    verb: str


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_run(run_dir: Any, cfg: Any) -> None:
    """Refuse a run directory whose checkpoints came from another config (keys in ``RESUME_FREE`` may differ;
    a key the old config lacks was added later and matches when the new value is its default)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = _flat(yaml.safe_load(path.read_text()) or {})
    new = _flat(cfg.to_dict())
    defaults = _flat(type(cfg)().to_dict())
    diff = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE and old.get(k, defaults.get(k)) != new.get(k))
    if diff and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ValueError(f"{run_dir}: holds checkpoints of a different config (changed: {', '.join(diff[:6])}); "
                         f"use another --out or delete the directory")


def open_run(cfg: Any, run_dir: Any, verb: str) -> Run:
    """Start ``jax.distributed`` (per ``cfg.distributed``), make and check the run directory, write the
    resolved ``config.yaml`` (process 0) and build the mesh."""
    import yaml

    maybe_initialize_distributed(cfg.distributed)
    is_main = jax.process_index() == 0
    run_dir = run_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_run(run_dir, cfg)
    if is_main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return Run(run_dir, is_main, build_mesh(cfg.mesh), verb)


def write_json(run: Run, name: str, obj: Any) -> None:
    if run.is_main:
        write_text(run.run_dir / name, json.dumps(obj, indent=1))


def check_rows(name: str, rows: int, mesh_rows: int) -> None:
    if rows % mesh_rows:
        raise ValueError(f"{name}={rows} must be divisible by mesh data x fsdp = {mesh_rows}")


def restore(run: Run, ckpt: Checkpointer, state: Any, steps_per_epoch: int, updates_per_step: int = 1
            ) -> tuple[Any, int]:
    """(state, start step): the latest finalised checkpoint, if any, whose data position must be the one its
    step implies (``state.step`` counts optimiser updates, ``updates_per_step`` of them per loop step)."""
    if ckpt.latest_step() is None:
        return state, 0
    state, meta = ckpt.restore(state)
    start = int(jax.device_get(state.step)) // updates_per_step
    if meta.get("data_position") != list(divmod(start, steps_per_epoch)):
        raise ValueError(f"{ckpt.directory}: checkpoint data position {meta.get('data_position')} does not match "
                         f"step {start} with {steps_per_epoch} steps/epoch (data changed?)")
    if run.is_main:
        print(f"emajax {run.verb}: resumed from {ckpt.directory}/{start}", flush=True)
    return state, start


def append_row(run: Run, name: str, row: dict[str, Any]) -> None:
    """One row of a per-run JSONL log (process 0; local append, remote whole rewrite)."""
    from emajax.train.metrics import append_jsonl

    if run.is_main:
        append_jsonl(run.run_dir / name, row)


def trim_logs(run: Run, names: Iterable[str], start: int) -> None:
    """Drop the rows after the restored step from JSONL logs a resumed run appends to again."""
    if not run.is_main:
        return
    for name in names:
        path = run.run_dir / name
        if is_remote(path):
            if path.exists():
                write_text(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= start))
        else:
            atomic.keep_jsonl_rows(Path(path), lambda r: r.get("step", 0) <= start)


@dataclasses.dataclass
class Loop:
    """What ``run_steps`` runs: ``step(state, i) -> (state, row)`` makes loop step i (0-based) and its metrics
    row (``row["step"] == i + 1``, ``row["loss"]`` checked for NaN); ``evaluate(state, step)`` (optional) runs at
    step 0 of a fresh run, every ``eval_every`` steps and at the end; each ``callbacks`` entry
    ``(step, state)`` runs at step 0 of a fresh run and after every step; ``meta(step)`` is the checkpoint
    metadata (its ``data_position`` is what ``restore`` checks)."""

    step: Callable[[Any, int], tuple[Any, dict[str, Any]]]
    meta: Callable[[int], dict[str, Any]]
    evaluate: Callable[[Any, int], None] | None = None
    eval_every: int = 0
    callbacks: tuple[Callable[[int, Any], None], ...] = ()


def run_steps(run: Run, loop: Loop, state: Any, *, start: int, end: int, ckpt: Checkpointer,
              logger: MetricsLogger) -> tuple[Any, dict[str, Any]]:
    """Steps ``start .. end - 1`` with their hooks; the state at ``end`` is always checkpointed. Returns
    (state, last metrics row). The logger and checkpointer are closed on the way out."""
    last: dict[str, Any] = {}
    saved_at = start
    try:
        if start == 0 and end > 0:
            if loop.evaluate is not None:
                loop.evaluate(state, 0)
            for cb in loop.callbacks:
                cb(0, state)
        for i in range(start, end):
            state, last = loop.step(state, i)
            logger.log(last)
            for cb in loop.callbacks:
                cb(i + 1, state)
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"step {i + 1}: loss is {last['loss']} (metrics {last})")
            if ckpt.save(i + 1, state, loop.meta(i + 1)):
                saved_at = i + 1
            if loop.evaluate is not None and loop.eval_every and (i + 1) % loop.eval_every == 0 and i + 1 < end:
                loop.evaluate(state, i + 1)
        if saved_at != end:
            ckpt.save(end, state, loop.meta(end), force=True)
        if loop.evaluate is not None and end > start:
            loop.evaluate(state, end)
    finally:
        logger.close()
        ckpt.close()
    return state, last


def export_base_name(cfg: Any, loaded: Any) -> str:
    """The base model an exported adapter names: a hub id as given (portable), else the loaded directory."""
    name = cfg.model.name
    if name.count("/") == 1 and not Path(name).exists():
        return name
    return str(getattr(loaded, "model_dir", name))


def export(graphdef: Any, state: Any, cfg: Any, out_dir: Any, tokenizer: Any, base_name: str, *,
           write: bool = True) -> Any:
    """PEFT adapter (LoRA) or merged HF model (full FT) of the trained weights (never with steering).

    Weights sharded over several processes are gathered one tensor at a time
    (``emajax.models.hf_io``), so with ``jax.distributed`` every process must call this; only those
    with ``write`` write. A remote ``out_dir`` is written locally first and uploaded, its config file
    last. Returns ``out_dir`` (None where ``write`` is false)."""
    import tempfile

    from flax import nnx

    from emajax.models.hf_io import export_hf, export_peft_adapter
    from emajax.paths import upload_dir

    model = nnx.merge(graphdef, state.trainable, state.frozen)
    out_dir = run_path(out_dir)
    with tempfile.TemporaryDirectory(prefix="emajax-export-") as tmp:
        local = Path(tmp) / "export" if is_remote(out_dir) else Path(out_dir)
        if cfg.lora.enabled:
            export_peft_adapter(model, local, base_model_name_or_path=base_name, write=write)
        else:
            export_hf(model, local, tokenizer, write=write)
        if write and is_remote(out_dir):
            upload_dir(local, out_dir, last=("config.json", "adapter_config.json"))
    return out_dir if write else None
