"""The pure, compiled GRPO update: ``rl_step(state, batch) -> (state, metrics)`` for one rollout batch.

``batch`` holds the rollout rows in SFT's layout ([A, B, T]: inputs, targets, loss_mask, attn_mask,
positions; A micro-batches of B rows), ``advantages`` [A, B] and, on interleaving steps, ``sft``: a safe
SFT batch in the same layout. One call:

1. a forward-only pre-pass over the micro-batches: the sampling policy's log-probabilities of the
   sampled tokens (only when ``inner_updates`` > 1; with one update they equal the differentiated ones)
   and the reference's (adapters off or the frozen copy, never steered; when a KL weight or KL logging
   is on);
2. ``inner_updates`` optimiser updates (``lax.scan``), each accumulating the gradient of the policy
   objective (``emajax.rl.loss.policy_objective``) over the micro-batches plus, with ``sft``,
   ``sft_weight`` x the SFT cross-entropy of the safe batch (``emajax.train.step.loss_terms``: the same
   CE as ``emajax train``).

Every trained forward pass carries ``state.steer_ld`` (preventative steering). The state is SFT's
``TrainState``: ``state.step`` counts optimiser updates (the schedule's clock), ``state.rng`` is split
once per call. Jitted with the state's shardings, rows over (data, fsdp), the state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emajax.models.sharding import BATCH_AXES
from emajax.rl.loss import policy_objective, token_logp_entropy, token_weights
from emajax.train.mesh import accum_batch_sharding, replicated
from emajax.train.state import TrainState, state_shardings
from emajax.train.step import BATCH_FIELDS, StepSpec, _forward, loss_terms, reference_outputs


@dataclasses.dataclass(frozen=True)
class RlStepSpec:
    lora: bool
    inner_updates: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_weight: float = 0.0
    log_kl: bool = True
    aggregation: str = "token"
    sft_weight: float = 0.0
    seq_chunk: int | None = None

    @property
    def need_ref(self) -> bool:
        return self.kl_weight > 0 or self.log_kl


def _policy_hidden(graphdef: Any, trainable: Any, state: TrainState, mb: dict[str, jax.Array]) -> tuple[Any, Any]:
    out, w_dv = _forward(graphdef, (trainable, state.frozen), mb, layers=(), steer_ld=state.steer_ld, lora_scale=1.0)
    return out.hidden_btd, w_dv


def _mean_over_updates(ms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.mean(v, axis=0) for k, v in ms.items()}


def make_rl_step(graphdef: Any, spec: RlStepSpec, tx: optax.GradientTransformation,
                 schedule: Callable[[Any], Any]) -> Callable[[TrainState, dict[str, Any]], Any]:
    """The uncompiled step (see module doc)."""
    sft_spec = StepSpec(lora=spec.lora, seq_chunk=spec.seq_chunk)  # CE only, as SFT computes it

    def prepass(state: TrainState, rows: dict[str, jax.Array]) -> dict[str, jax.Array]:
        def one(mb):
            out = {}
            if spec.inner_updates > 1:
                h, w = _policy_hidden(graphdef, state.trainable, state, mb)
                out["old"] = token_logp_entropy(h, w, mb["targets"], mb["loss_mask"], seq_chunk=spec.seq_chunk)[0]
            if spec.need_ref:
                ref_out, ref_w = reference_outputs(graphdef, sft_spec, state, mb)
                out["ref"] = token_logp_entropy(ref_out.hidden_btd, ref_w, mb["targets"], mb["loss_mask"],
                                                seq_chunk=spec.seq_chunk)[0]
            return out

        return jax.lax.map(one, rows) if (spec.inner_updates > 1 or spec.need_ref) else {}

    def policy_grads(state: TrainState, rows, weights, adv, pre):
        def micro(xs):
            mb, wt, a, old, ref = xs

            def loss_fn(tr):
                h, w = _policy_hidden(graphdef, tr, state, mb)
                return policy_objective(h, w, mb["targets"], wt, a, old_logp_bt=old, ref_logp_bt=ref,
                                        clip_eps=spec.clip_eps, clip_eps_high=spec.clip_eps_high,
                                        kl_weight=spec.kl_weight, seq_chunk=spec.seq_chunk)

            (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            return g, {**m, "policy_loss": loss}

        xs = (rows, weights, adv, pre.get("old"), pre.get("ref"))
        return _accumulate(micro, state, xs)

    def sft_grads(state: TrainState, sft: dict[str, jax.Array]):
        def micro(mb):
            g, m = jax.grad(lambda tr: loss_terms(graphdef, sft_spec, tr, state, mb, None), has_aux=True)(state.trainable)
            return g, {"sft_ce": m["ce"]}

        g, m = _accumulate(micro, state, sft)
        a = sft["inputs"].shape[0]
        return jax.tree.map(lambda x: x / a, g), {k: v / a for k, v in m.items()}

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        rows = {k: batch[k] for k in BATCH_FIELDS}
        weights = token_weights(rows["loss_mask"], spec.aggregation)
        pre = prepass(state, rows)

        def update(st: TrainState, _):
            grads, metrics = policy_grads(st, rows, weights, batch["advantages"], pre)
            metrics["loss"] = metrics["policy_loss"]
            if "sft" in batch:
                g_sft, m_sft = sft_grads(st, batch["sft"])
                grads = jax.tree.map(lambda g, s: g + spec.sft_weight * s, grads, g_sft)
                metrics.update(m_sft)
                metrics["loss"] = metrics["loss"] + spec.sft_weight * m_sft["sft_ce"]
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["lr"] = jnp.asarray(schedule(st.step), jnp.float32)
            updates, opt_state = tx.update(grads, st.opt_state, st.trainable)
            trainable = optax.apply_updates(st.trainable, updates)
            return st._replace(trainable=trainable, opt_state=opt_state, step=st.step + 1), metrics

        state, ms = jax.lax.scan(update, state, None, length=spec.inner_updates)
        metrics = _mean_over_updates(ms)
        if not spec.need_ref:
            metrics.pop("kl")
        rng, _ = jax.random.split(state.rng)
        return state._replace(rng=rng), metrics

    return step


def _accumulate(micro: Callable, state: TrainState, xs: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Sum of ``micro(x)``'s (grads, metrics) over the leading (micro-batch) axis of ``xs``."""
    first = jax.tree.map(lambda x: x[0], xs)
    m_shape = jax.eval_shape(lambda: micro(first)[1])
    zeros = (jax.tree.map(jnp.zeros_like, state.trainable),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))

    def body(carry, x):
        g, m = micro(x)
        return jax.tree.map(jnp.add, carry, (g, m)), None

    return jax.lax.scan(body, zeros, xs)[0]


def rl_batch_shardings(mesh: Mesh, with_sft: bool) -> dict[str, Any]:
    sh = accum_batch_sharding(mesh)
    out: dict[str, Any] = {k: sh for k in BATCH_FIELDS}
    out["advantages"] = NamedSharding(mesh, P(None, BATCH_AXES))
    if with_sft:
        out["sft"] = {k: sh for k in BATCH_FIELDS}
    return out


def compile_rl_step(graphdef: Any, spec: RlStepSpec, tx: optax.GradientTransformation, schedule: Callable,
                    state: TrainState, mesh: Mesh) -> Callable[[TrainState, dict[str, Any]], Any]:
    """jit with explicit in/out shardings, state donated; one program with and one without an SFT batch."""
    st_sh = state_shardings(state)
    fn = make_rl_step(graphdef, spec, tx, schedule)
    compiled: dict[bool, Callable] = {}

    def call(state: TrainState, batch: dict[str, Any]):
        key = "sft" in batch
        if key not in compiled:
            compiled[key] = jax.jit(fn, in_shardings=(st_sh, rl_batch_shardings(mesh, key)),
                                    out_shardings=(st_sh, replicated(mesh)), donate_argnums=(0,))
        return compiled[key](state, batch)

    return call
