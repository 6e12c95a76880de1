"""Orbax checkpoints of the mutable part of the training state, for exact resume.

Saved: trainable params, optimiser state, step, rng (as one flat dict of arrays keyed by their
tree path) plus JSON metadata (data position, config digest). The frozen weights, the reference
copy and the steering array are rebuilt from the base model and config. Orbax writes each step
into a temporary directory and renames it only once complete (on GCS: a commit marker), and
``CheckpointManager`` never lists an unfinalised step, so a kill mid-save leaves the previous
checkpoint as the latest one: never one that loads wrong.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from emajax.paths import run_path
from emajax.train.state import TrainState

_SAVED = ("trainable", "opt_state", "step", "rng")


def _key(i: int, path: tuple[Any, ...]) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return f"{i:05d}_" + re.sub(r"[^A-Za-z0-9_]+", "_", ".".join(names)).strip("_")


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(i, p): leaf for i, (p, leaf) in enumerate(leaves)}, treedef


def _saved_part(state: TrainState) -> dict[str, Any]:
    return {k: getattr(state, k) for k in _SAVED}


class Checkpointer:
    """``CheckpointManager`` over ``run_dir/checkpoints``: every ``save_every`` steps (+ forced at the end).

    ``directory`` may be remote (``gs://...``): it is an ``etils.epath.Path``, as orbax expects. With
    several processes every one of them calls save/restore (each writes its own shards)."""

    def __init__(self, directory: Any, *, save_every: int, keep: int):
        self.directory = run_path(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), save_interval_steps=max(1, save_every),
                                            create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = False) -> bool:
        flat, _ = _flat(_saved_part(state))
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                                meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()
        return bool(saved)

    def restore(self, state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Load into the structure, dtypes and shardings of ``state`` (a freshly initialised one)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no finalised checkpoint")
        part = _saved_part(state)
        flat, treedef = _flat(part)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flat.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        restored = out["state"]
        missing = set(abstract) - set(restored)
        if missing:
            raise ValueError(f"{self.directory}/{step}: checkpoint lacks {sorted(missing)[:3]} (different model/LoRA config?)")
        leaves = [restored[k] for k in flat]
        new = jax.tree_util.tree_unflatten(treedef, leaves)
        return state._replace(**new), dict(out["meta"])

    def close(self) -> None:
        self.manager.close()
