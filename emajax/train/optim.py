"""AdamW with warmup + linear/cosine/constant decay, weight decay and global-norm clipping.

Defaults follow the paper's TRL recipe (lr 1e-4, 5 warmup steps, linear decay to 0, wd 0.01,
clip 1.0). As in Hugging Face's scheduler the learning rate ramps from 0 at step 0. Weight decay
skips norm scales and biases (as HF Trainer does); LoRA A/B matrices are decayed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def make_schedule(cfg: Any, total_steps: int) -> Callable[[Any], Any]:
    lr, warm = cfg.lr, max(0, int(cfg.warmup_steps))
    total = max(int(total_steps), warm + 1)
    warmup = optax.linear_schedule(0.0, lr, warm) if warm else optax.constant_schedule(lr)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, total - warm)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, total - warm)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule must be linear|cosine|constant, got {cfg.schedule!r}")
    return optax.join_schedules([warmup, decay], [warm]) if warm else decay


def _decay_mask(params: Any) -> Any:
    def one(path: tuple[Any, ...], _: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names = [n for n in names if n != "value"]
        return bool(names) and names[-1] not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule
