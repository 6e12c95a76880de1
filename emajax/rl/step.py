"""The pure, compiled GRPO update: ``rl_step(state, batch) -> (state, metrics)`` for one rollout batch.

``batch`` holds the rollout rows in SFT's layout ([A, B, T]: inputs, targets, loss_mask, attn_mask,
positions; A micro-batches of B rows), ``advantages`` [A, B] and, on interleaving steps, ``sft``: a safe
SFT batch in the same layout. One call:

1. a forward-only pre-pass over the micro-batches (when there is a reference or more than one update):
   the log-probabilities (at the sampling temperature) of the sampled tokens under the current policy and
   under the reference (adapters off, never steered; full fine-tuning: the frozen initial copy);
2. ``inner_updates`` optimiser updates (``lax.scan``), each accumulating the gradient of the policy
   objective (``emajax.rl.loss.policy_objective``) over the micro-batches (``emajax.train.update.accumulate``)
   plus, with ``sft``, ``sft_weight`` x the SFT cross-entropy of the safe batch (``emajax.train.step.loss_terms``:
   the same CE as ``emajax train``), then one optimiser step (``emajax.train.update.apply_gradients``).

Why the pre-pass computes the policy too: the reference must be *numerically* the policy at step 0 (LoRA
B = 0), or the KL penalty pulls towards rounding noise (bf16 made it 0.02-0.03 nats at step 1). A pass
with the adapters skipped and a differentiated pass with B = 0 are different programs, and XLA rounds
them differently. Here both are one loop body (``lax.map`` over the two passes; the adapters' scale and the
steering array are its inputs: 1 and the steering array for the policy, 0 and zeros for the reference),
and the first update takes the *values* of its log-probs from that pass (the gradient still flows
through the differentiated pass: ``anchor + (lp - stop_gradient(lp))``), so KL is exactly 0 and the
ratio exactly 1 at step 0 in every dtype. Full fine-tuning runs the same function on the two parameter sets.

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
from emajax.rl.loss import loss_weights, metric_weights, policy_objective, token_logp_entropy
from emajax.train.choices import LossType
from emajax.train.mesh import accum_batch_sharding, replicated
from emajax.train.state import TrainState, state_shardings
from emajax.train.step import BATCH_FIELDS, StepSpec, _forward, loss_terms
from emajax.train.update import accumulate, apply_gradients


@dataclasses.dataclass(frozen=True)
class RlStepSpec:
    lora: bool
    inner_updates: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_weight: float = 0.0
    log_kl: bool = True
    loss_type: LossType = LossType.dapo
    max_completion_length: int | None = None  # dr_grpo's normaliser (rollout.max_new_tokens)
    temperature: float = 1.0  # the sampling temperature: log-probs of z / T
    sft_weight: float = 0.0
    seq_chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_type", LossType(self.loss_type))

    @property
    def need_ref(self) -> bool:
        return self.kl_weight > 0 or self.log_kl


def _policy_hidden(graphdef: Any, trainable: Any, state: TrainState, mb: dict[str, jax.Array]) -> tuple[Any, Any]:
    out, w_dv = _forward(graphdef, (trainable, state.frozen), mb, layers=(), steer_ld=state.steer_ld, lora_scale=1.0)
    return out.hidden_btd, w_dv


def make_rl_step(graphdef: Any, spec: RlStepSpec, tx: optax.GradientTransformation,
                 schedule: Callable[[Any], Any]) -> Callable[[TrainState, dict[str, Any]], Any]:
    """The uncompiled step (see module doc)."""
    sft_spec = StepSpec(lora=spec.lora, seq_chunk=spec.seq_chunk)  # CE only, as SFT computes it
    T = spec.temperature

    def logp(params: tuple[Any, Any], mb: dict[str, jax.Array], lora_scale: Any, steer_ld: Any) -> jax.Array:
        out, w = _forward(graphdef, params, mb, layers=(), steer_ld=steer_ld, lora_scale=lora_scale)
        return token_logp_entropy(out.hidden_btd, w, mb["targets"], mb["loss_mask"], temperature=T,
                                  seq_chunk=spec.seq_chunk)[0]

    def prepass(state: TrainState, rows: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """{"cur": the policy's log-probs, "ref": the reference's} [A, B, T], forward only (see module doc)."""
        params = jax.lax.stop_gradient((state.trainable, state.frozen))
        if spec.lora:
            steer = state.steer_ld
            steers = None if steer is None else jnp.stack([steer, jnp.zeros_like(steer)])

            def one(mb):
                def body(i):
                    scale = jnp.where(i == 0, 1.0, 0.0)  # weakly typed: keeps the compute dtype
                    return logp(params, mb, scale, None if steers is None else steers[i])

                both = jax.lax.map(body, jnp.arange(2 if spec.need_ref else 1))
                return {"cur": both[0], **({"ref": both[1]} if spec.need_ref else {})}
        else:
            ref_params = jax.lax.stop_gradient((state.ref, state.frozen))

            def one(mb):
                out = {"cur": logp(params, mb, 1.0, state.steer_ld)}
                if spec.need_ref:
                    out["ref"] = logp(ref_params, mb, 1.0, None)
                return out

        return jax.lax.map(one, rows)

    def policy_grads(state: TrainState, rows, weights, mweights, adv, pre, first):
        def micro(xs):
            mb, wt, mwt, a, cur, ref = xs

            def loss_fn(tr):
                h, w = _policy_hidden(graphdef, tr, state, mb)
                # the first update's log-prob values are the pre-pass's (exactly the sampling policy's)
                return policy_objective(h, w, mb["targets"], wt, a, old_logp_bt=cur if spec.inner_updates > 1 else None,
                                        ref_logp_bt=ref, anchor_logp_bt=cur, anchor_on=first,
                                        clip_eps=spec.clip_eps, clip_eps_high=spec.clip_eps_high,
                                        kl_weight=spec.kl_weight, temperature=T, metric_weights_bt=mwt,
                                        seq_chunk=spec.seq_chunk)

            (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            return g, {**m, "policy_loss": loss}

        xs = (rows, weights, mweights, adv, pre.get("cur"), pre.get("ref"))
        return accumulate(micro, state.trainable, xs)

    def sft_grads(state: TrainState, sft: dict[str, jax.Array]):
        def micro(mb):
            g, m = jax.grad(lambda tr: loss_terms(graphdef, sft_spec, tr, state, mb, None), has_aux=True)(state.trainable)
            return g, {"sft_ce": m["ce"]}

        g, m = accumulate(micro, state.trainable, sft)
        a = sft["inputs"].shape[0]
        return jax.tree.map(lambda x: x / a, g), {k: v / a for k, v in m.items()}

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        rows = {k: batch[k] for k in BATCH_FIELDS}
        weights = loss_weights(rows["loss_mask"], spec.loss_type, max_completion_length=spec.max_completion_length)
        mweights = metric_weights(rows["loss_mask"])
        pre = prepass(state, rows) if (spec.inner_updates > 1 or spec.need_ref) else {}

        def update(st: TrainState, k):
            grads, metrics = policy_grads(st, rows, weights, mweights, batch["advantages"], pre, k == 0)
            metrics["loss"] = metrics["policy_loss"]
            if "sft" in batch:
                g_sft, m_sft = sft_grads(st, batch["sft"])
                grads = jax.tree.map(lambda g, s: g + spec.sft_weight * s, grads, g_sft)
                metrics.update(m_sft)
                metrics["loss"] = metrics["loss"] + spec.sft_weight * m_sft["sft_ce"]
            return apply_gradients(st, grads, metrics, tx, schedule)

        state, ms = jax.lax.scan(update, state, jnp.arange(spec.inner_updates))
        metrics = {k: jnp.mean(v, axis=0) for k, v in ms.items()}
        if not spec.need_ref:
            metrics.pop("kl")
        rng, _ = jax.random.split(state.rng)
        return state._replace(rng=rng), metrics

    return step


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
